"""`knnlm serve`: an OpenAI-compatible /v1/completions endpoint with log-probabilities over a local model, optionally
the kNN-LM (--datastore) or MLP-LM (--mlp_memory) built on it."""
from __future__ import annotations

import signal
import threading

from ..config import add_command, resolve


def register(sub) -> None:
    from ..augmented import AugmentArgs
    from ..knn import KNNArgs
    from ..models import ModelArgs
    from ..serve import ServeArgs

    add_command(sub, "serve", (ModelArgs, ServeArgs, AugmentArgs, KNNArgs), cmd_serve,
                help="serve a local model (or its kNN-LM / MLP-LM) as an OpenAI-compatible /v1/completions endpoint "
                     "with logprobs")


def cmd_serve(args) -> int:
    from ..augmented import AugmentArgs, augment_from_args
    from ..datastore import Datastore
    from ..errors import KnnlmError
    from ..knn import KNNArgs
    from ..models import ModelArgs, load_model
    from ..serve import ServeArgs
    from ..serve_http import start_server

    margs, sargs, aargs, kargs = resolve([ModelArgs, ServeArgs, AugmentArgs, KNNArgs], args, args.config)
    kargs.refuse_inactive(bool(aargs.datastore), bool(aargs.mlp_memory))
    if aargs.datastore:
        if kargs.lmbda == [1.0]:  # pure kNN: -inf log-probabilities, which JSON (RFC 8259) cannot carry
            raise KnnlmError("--lmbda: 1 gives every token outside the neighbours log-probability -inf, which the "
                             "API's JSON cannot carry; use a weight below 1 (e.g. 0.99)")
        Datastore.open(aargs.datastore)  # a missing or truncated store is reported before the model loads
    lm = load_model(margs)
    model = augment_from_args(lm, aargs, kargs)
    server, thread = start_server(lm, sargs)
    stop = threading.Event()

    def on_signal(signum, frame):  # the first SIGTERM / SIGINT stops gracefully, a second one cuts the grace short
        if stop.is_set():
            server.force()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    what = f" ({model.knnlm.summary()})" if model is not None else ""
    print(f"serving {server.engine.name}{what} at {server.url} (POST /completions, GET /models); Ctrl-C or SIGTERM "
          "stops", flush=True)
    if sargs.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {sargs.host}: reachable from other machines" +
              ("" if sargs.api_key else "; set --api_key to require a key"), flush=True)
    while thread.is_alive() and not stop.wait(1.0):
        pass
    print(f"stopping: no new connections; requests in flight get up to {sargs.shutdown_grace_s:g} s "
          "(--shutdown_grace_s); a second signal stops at once", flush=True)
    cut = server.stop()
    server.server_close()
    print(f"stopped ({cut} request(s) cut off)" if cut else "stopped", flush=True)
    return 0
