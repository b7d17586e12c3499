"""`knnlm serve`: an OpenAI-compatible /v1/completions endpoint with log-probabilities over a local model, optionally
the kNN-LM (--datastore) or MLP-LM (--mlp_memory) built on it."""
from __future__ import annotations

import signal

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
    from ..knn import KNNArgs
    from ..models import ModelArgs, load_model
    from ..serve import ServeArgs, start_server

    margs, sargs, aargs, kargs = resolve([ModelArgs, ServeArgs, AugmentArgs, KNNArgs], args, args.config)
    if aargs.datastore:
        Datastore.open(aargs.datastore)  # a missing or truncated store is reported before the model loads
    lm = load_model(margs)
    model = augment_from_args(lm, aargs, kargs)
    server, thread = start_server(lm, sargs)
    what = f" ({model.knnlm.summary()})" if model is not None else ""
    print(f"serving {server.engine.name}{what} at {server.url} (POST /completions, GET /models); Ctrl-C stops",
          flush=True)
    if sargs.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {sargs.host}: reachable from other machines" +
              ("" if sargs.api_key else "; set --api_key to require a key"), flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops it as cleanly as Ctrl-C
    try:
        thread.join()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.shutdown()
        server.server_close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
