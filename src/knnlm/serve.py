"""`knnlm serve`: a minimal OpenAI-compatible completions endpoint with log-probabilities over a local HF model.

``POST /v1/completions`` takes ``model``, ``prompt`` (a string, a list of strings, a list of token ids or a list of such
lists), ``max_tokens`` (0 allowed), ``echo``, ``logprobs`` (int: how many alternatives per position), ``temperature``
(0 = greedy), ``seed`` and ``stop`` (strings that end the generated text, which excludes them). Each choice carries
``logprobs`` = ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset`` as the legacy OpenAI API and vLLM
return them: with ``echo`` the prompt's tokens come first, the first one with a null log-probability (nothing
predicts it). ``GET /v1/models`` lists the one served model.

Log-probabilities are the model's raw ``log_softmax`` (float32), independent of ``temperature``. With a model augmented
by :func:`knnlm.augmented.augment` (``knnlm serve --datastore``) they are log p_knnlm, and generation samples from it.
The server is meant for local scoring: it binds 127.0.0.1 by default and checks a bearer key only when one is set.

Robustness: every malformed request gets a 4xx JSON error (bad JSON, non-UTF-8 bodies, NaN/Infinity, nesting too deep,
wrong types, a missing, invalid or lying Content-Length). Connections are served by a bounded pool of ``--workers``
threads with up to ``--max_queue`` more waiting, behind a listen backlog of ``REQUEST_QUEUE_SIZE``; a connection beyond
that capacity is answered 503 with ``Retry-After`` (its request is read first, so the client sees the answer rather
than a reset). The model computes one request at a time.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Optional

import torch

from .errors import KnnlmError

log = logging.getLogger(__name__)

_DETOK_WINDOW = 6  # tokens of left context used to decode one token's text (incremental detokenization)
REQUEST_QUEUE_SIZE = 256  # listen backlog: connections the kernel holds before accept (http.server's default is 5)
MAX_BODY_BYTES = 8 << 20  # a larger Content-Length is refused with 413
MIN_TEMPERATURE = 1e-5  # below this (but > 0) logits / T overflow; 0 means greedy (vLLM's _SAMPLING_EPS)
RETRY_AFTER_S = 1


@dataclass
class ServeArgs:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 127.0.0.1 keeps the server local (there is no TLS)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)."})
    served_model_name: Optional[str] = field(default=None, metadata={"help": "Model name clients send in `model` (default: --model_name_or_path)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "When set, requests must send `Authorization: Bearer <key>`."})
    max_logprobs: int = field(default=20, metadata={"help": "Largest `logprobs` a request may ask for."})
    workers: int = field(default=32, metadata={"help": "Threads serving connections (the model itself computes one request at a time)."})
    max_queue: int = field(default=64, metadata={"help": "Connections that may wait for a worker; beyond workers + max_queue a request gets 503 with Retry-After."})
    request_timeout_s: float = field(default=30.0, metadata={"help": "Seconds a connection may stay silent (an idle keep-alive, or a body shorter than its Content-Length: 408)."})

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise KnnlmError(f"--port: {self.port} is not a TCP port; use 0-65535")
        if self.max_logprobs < 0:
            raise KnnlmError("--max_logprobs: must be >= 0")
        if self.workers < 1:
            raise KnnlmError(f"--workers: must be >= 1, got {self.workers}")
        if self.max_queue < 0:
            raise KnnlmError(f"--max_queue: must be >= 0, got {self.max_queue}")
        if not self.request_timeout_s > 0:
            raise KnnlmError(f"--request_timeout_s: must be > 0, got {self.request_timeout_s}")


class ApiError(Exception):
    """A request the server refuses, answered as an OpenAI-style error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# ------------------------------------------------------------------------------------------------------------ engine
class CompletionEngine:
    """Answers completion requests with one local LM (``knnlm.models.LM``). One request computes at a time."""

    def __init__(self, lm, name: str | None = None, max_logprobs: int = 20):
        self.lm, self.name, self.max_logprobs = lm, name or lm.name, max_logprobs
        self.created = int(time.time())
        self._lock = threading.Lock()
        # the KV-cache argument was renamed from past_key_values to cache in transformers 5
        params = inspect.signature(getattr(lm, "base", lm.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are needed while generating (and, augmented, only it is queried)
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    # -- tokens <-> text
    def _decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_texts(self, ids: list[int], context: list[int] = ()) -> list[str]:
        """The text each token adds to the decoded string (special tokens add ''); ``context`` precedes ``ids``."""
        seq, out = list(context) + list(ids), []
        for i in range(len(context), len(seq)):
            start = max(0, i - _DETOK_WINDOW)
            before = self._decode(seq[start:i])
            out.append(self._decode(seq[start:i + 1])[len(before):])
        return out

    def _top_dict(self, logp: torch.Tensor, chosen: int, n: int) -> dict[str, float]:
        """The ``n`` most likely tokens at one position plus the chosen one, as {token text: log-prob}."""
        top = torch.topk(logp, n).indices.tolist() if n > 0 else []
        if chosen not in top:
            top.append(chosen)
        return {self._decode([t]): float(logp[t]) for t in top}

    # -- model
    @torch.no_grad()
    def _prompt_log_probs(self, ids: list[int]) -> torch.Tensor:
        """log_softmax of the model's logits at every prompt position: [T, V] float32 on the CPU."""
        x = torch.tensor([ids], dtype=torch.long, device=self.lm.device)  # [1, T]
        logits = self.lm.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]  # [T, V]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    @torch.no_grad()
    def _generate(self, ids: list[int], max_tokens: int, temperature: float, seed: int | None, stop=()):
        """Greedy (temperature 0) or sampled continuation: (new ids, [n, V] log-probs of each step's distribution).

        Stops after EOS, ``max_tokens``, or the first token that completes one of the ``stop`` strings."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        x = torch.tensor([ids], dtype=torch.long, device=self.lm.device)  # [1, T]
        past, new, steps = None, [], []
        eos = self.lm.eos_token_id
        for _ in range(max_tokens):
            out = self.lm.model(input_ids=x, use_cache=True, **self._keep, **{self._cache_kw: past})
            past = getattr(out, self._cache_kw)
            logits = out.logits[0, -1].float().cpu()  # [V]
            logp = torch.log_softmax(logits, dim=-1)
            if temperature == 0:
                tok = int(torch.argmax(logits))
            else:
                tok = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
            new.append(tok)
            steps.append(logp)
            if tok == eos or (stop and any(st in self._decode(new) for st in stop)):
                break
            x = torch.tensor([[tok]], dtype=torch.long, device=self.lm.device)
        return new, steps

    # -- request
    def _prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """Normalises ``prompt`` to a list of (text or None, token ids)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, "`prompt` must be a string, a list of strings or a list of token-id lists", "prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((p, list(self.lm.encode(p))))
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < self.lm.vocab_size for t in p):
                out.append((None, list(p)))
            else:
                raise ApiError(400, "each prompt must be a non-empty string or a non-empty list of valid token ids", "prompt")
            if not out[-1][1]:
                raise ApiError(400, "a prompt encodes to no tokens", "prompt")
        return out

    def _parse(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", "model")
        if model is not None and model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", "model",
                           "NotFoundError")
        max_tokens = _field(body, "max_tokens", int, 16)
        if max_tokens < 0:
            raise ApiError(400, "`max_tokens` must be an integer >= 0", "max_tokens")
        logprobs = _field(body, "logprobs", int, None)
        if logprobs is not None and logprobs < 0:
            raise ApiError(400, "`logprobs` must be an integer >= 0", "logprobs")
        if logprobs is not None and logprobs > self.max_logprobs:
            raise ApiError(400, f"`logprobs` = {logprobs} exceeds this server's limit of {self.max_logprobs} "
                                "(knnlm serve --max_logprobs); ask for fewer alternatives per token or restart the "
                                "server with a larger --max_logprobs", "logprobs")
        temperature = float(_field(body, "temperature", float, 1.0))
        if not math.isfinite(temperature) or temperature < 0:
            raise ApiError(400, f"`temperature` must be a finite number >= 0, got {temperature}", "temperature")
        if 0 < temperature < MIN_TEMPERATURE:
            raise ApiError(400, f"`temperature` {temperature} is too small to sample with (the logits would "
                                f"overflow); use 0 for greedy decoding or a value >= {MIN_TEMPERATURE}", "temperature")
        echo = _field(body, "echo", bool, False)
        if _field(body, "stream", bool, False) or _field(body, "n", int, 1) != 1:
            raise ApiError(400, "only n=1 without streaming is supported", "n")
        if not echo and max_tokens == 0:
            raise ApiError(400, "max_tokens=0 returns nothing without echo=true", "max_tokens")
        seed = _field(body, "seed", int, None)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(x, str) and x for x in stop):
            raise ApiError(400, "`stop` must be a non-empty string or a list of at most 16 of them", "stop")
        return {"prompts": self._prompts(body.get("prompt")), "max_tokens": max_tokens, "logprobs": logprobs,
                "temperature": temperature, "echo": echo, "seed": seed, "stop": stop}

    def _choice(self, index: int, ids: list[int], req: dict) -> tuple[dict, int]:
        n_ctx = self.lm.max_positions
        if len(ids) + req["max_tokens"] > n_ctx:
            raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has {len(ids)} "
                                f"and max_tokens is {req['max_tokens']}", "prompt")
        want = req["logprobs"]
        tokens, token_lps, tops = [], [], []
        if req["echo"]:
            tokens = self.token_texts(ids)
            token_lps.append(None)
            tops.append(None)
            if want is not None:
                logp = self._prompt_log_probs(ids)  # [T, V]
                for t in range(1, len(ids)):
                    token_lps.append(float(logp[t - 1, ids[t]]))
                    tops.append(self._top_dict(logp[t - 1], ids[t], want))
        new, steps = self._generate(ids, req["max_tokens"], req["temperature"], req["seed"], req["stop"]) \
            if req["max_tokens"] else ([], [])
        new_texts = self.token_texts(new, context=ids)
        cut = min((i for i in ("".join(new_texts).find(st) for st in req["stop"]) if i >= 0), default=None)
        if cut is not None:  # the text ends before the stop string; the tokens up to it stay, the last one clipped
            kept, pos = [], 0
            for piece in new_texts:
                if pos >= cut and kept:
                    break
                kept.append(piece[: max(0, cut - pos)])
                pos += len(piece)
            new_texts, new, steps = kept, new[: len(kept)], steps[: len(kept)]
        tokens += new_texts
        if want is not None:
            for tok, logp in zip(new, steps):
                token_lps.append(float(logp[tok]))
                tops.append(self._top_dict(logp, tok, want))
        text = "".join(tokens) if req["echo"] else "".join(new_texts)
        logprobs = None
        if want is not None:
            offsets, pos = [], 0
            for piece in tokens:
                offsets.append(pos)
                pos += len(piece)
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
        finish = "stop" if cut is not None or (new and new[-1] == self.lm.eos_token_id) else "length"
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}, len(new)

    def complete(self, body: dict) -> dict:
        """One ``/v1/completions`` request body -> the response body (raises ApiError on a bad request)."""
        req = self._parse(body)
        choices, n_prompt, n_new = [], 0, 0
        with self._lock:
            for i, (_, ids) in enumerate(req["prompts"]):
                choice, generated = self._choice(i, ids, req)
                choices.append(choice)
                n_prompt += len(ids)
                n_new += generated
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    def models(self) -> dict:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "knnlm",
                "max_model_len": self.lm.max_positions}
        aug = getattr(self.lm.model, "knnlm", None)
        if aug is not None:
            card["knnlm"] = aug.describe()  # the memory, k, λ, T the log-probs come from
        return {"object": "list", "data": [card]}


def _field(body: dict, name: str, kind: type, default):
    """``body[name]`` checked against ``kind`` (int: not a bool; float: an int or a float); null means ``default``."""
    value = body.get(name)
    if value is None:
        return default
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          bool: isinstance(value, bool)}[kind]
    if not ok:
        what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise ApiError(400, f"`{name}` must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes):
    """The JSON value of a request body; ApiError 400 for non-UTF-8, invalid JSON, NaN/Infinity or nesting too deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 (byte {e.start}); send UTF-8 encoded JSON") from None
    try:
        return json.loads(text or "null", parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and NaN/Infinity
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:80]})") from None


# ------------------------------------------------------------------------------------------------------------ HTTP
class _Handler(BaseHTTPRequestHandler):
    server_version = "knnlm-serve"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.request_timeout_s  # socket timeout: idle keep-alives and short bodies end
        super().setup()

    def log_message(self, fmt, *args):  # route http.server's access log through logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long, unknown method) as JSON bodies."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        try:
            self._send(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())
        except OSError:
            pass

    def _error(self, e: ApiError, close: bool = False) -> None:
        if close:  # the rest of the connection cannot be parsed: answer, then close without a reset
            self.close_connection = True
        self._send(e.status, e.body())
        if close:
            _drain(self.connection)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, ApiError(401, "missing or wrong API key", kind="authentication_error").body())
            return False
        return True

    def _read_body(self) -> bytes:
        """The request body by Content-Length; ApiError (411, 400, 413, 408) when it is missing, invalid or short."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked bodies are not supported; send a Content-Length")
        value = self.headers.get("Content-Length")
        if value is None:
            raise ApiError(411, "a POST needs a Content-Length header")
        if not value.strip().isdigit():
            raise ApiError(400, f"Content-Length {value[:40]!r} is not a non-negative integer")
        length = int(value)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the body ({length} bytes) exceeds {MAX_BODY_BYTES} bytes")
        chunks, got = [], 0
        try:
            while got < length:  # read1: what has arrived is kept when the socket times out
                chunk = self.rfile.read1(length - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (TimeoutError, socket.timeout):
            pass
        raw = b"".join(chunks)
        if len(raw) != length:
            raise ApiError(408, f"the body ended after {len(raw)} of the {length} bytes its Content-Length announced")
        return raw

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            if self._authorized():
                self._send(200, self.server.engine.models())
        else:
            self._send(404, ApiError(404, f"no route GET {path}", kind="not_found_error").body())

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            raw = self._read_body()
        except ApiError as e:
            self._error(e, close=True)
            return
        if not self._authorized():
            return
        if path != "/v1/completions":
            self._send(404, ApiError(404, f"no route POST {path}; this server offers /v1/completions",
                                     kind="not_found_error").body())
            return
        try:
            self._send(200, self.server.engine.complete(parse_body(raw)))
        except ApiError as e:
            self._send(e.status, e.body())
        except Exception as e:  # a bug or an out-of-memory: answer 500 and keep serving
            log.exception("completion failed")
            self._send(500, ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body())

    def _not_allowed(self):
        self.close_connection = True
        self._send(405, ApiError(405, f"method {self.command} is not allowed; use GET or POST").body(),
                   {"Allow": "GET, POST"})
        _drain(self.connection)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed


class _BusyHandler(_Handler):
    """Answers any request with 503 + Retry-After, after reading it (closing on unread data would reset)."""

    def _busy(self):
        try:
            self._read_body() if self.command == "POST" else None
        except ApiError:
            pass
        self.close_connection = True
        self._send(503, ApiError(503, f"the server is at capacity ({self.server.workers} workers, "
                                      f"{self.server.max_queue} waiting); retry after {RETRY_AFTER_S} s",
                                 kind="server_overloaded").body(), {"Retry-After": str(RETRY_AFTER_S)})
        _drain(self.connection)

    do_GET = do_POST = _busy


def _drain(sock, limit: int = 1 << 20, wait_s: float = 0.5) -> None:
    """Half-closes ``sock`` and reads what the client still sends, so that closing it sends FIN, not RST."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(wait_s)
        got = 0
        while got < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass


class CompletionServer(HTTPServer):
    """An HTTP server with a bounded worker pool: ``workers`` threads, ``max_queue`` waiting connections, and 503 +
    Retry-After (from at most ``workers`` short-lived threads) for connections beyond that."""

    request_queue_size = REQUEST_QUEUE_SIZE
    allow_reuse_address = True

    def __init__(self, engine: CompletionEngine, host: str, port: int, api_key: str | None = None, workers: int = 32,
                 max_queue: int = 64, request_timeout_s: float = 30.0):
        self.engine, self.api_key = engine, api_key
        self.workers, self.max_queue, self.request_timeout_s = workers, max_queue, request_timeout_s
        self._slots = threading.BoundedSemaphore(workers + max_queue)
        self._reject_slots = threading.BoundedSemaphore(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="knnlm-serve")
        self.rejected = 0
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            self._pool.shutdown(wait=False)
            raise KnnlmError(f"--port: cannot bind {host}:{port} ({e.strerror}); pick another port or stop the "
                             "process using it") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def process_request(self, request, client_address):
        if self._slots.acquire(blocking=False):
            self._pool.submit(self._serve, request, client_address, _Handler, self._slots)
        elif self._reject_slots.acquire(blocking=False):
            self.rejected += 1
            threading.Thread(target=self._serve, args=(request, client_address, _BusyHandler, self._reject_slots),
                             daemon=True).start()
        else:  # even the rejecters are busy: close at once (the kernel may reset it)
            self.rejected += 1
            self.shutdown_request(request)

    def _serve(self, request, client_address, handler, slots) -> None:
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slots.release()

    def handle_error(self, request, client_address):  # a client that went away: not worth a traceback
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def start_server(lm, args: ServeArgs) -> tuple[CompletionServer, threading.Thread]:
    """Starts serving ``lm`` in a background thread; stop with ``server.shutdown(); server.server_close()``."""
    engine = CompletionEngine(lm, args.served_model_name, args.max_logprobs)
    server = CompletionServer(engine, args.host, args.port, args.api_key, workers=args.workers,
                              max_queue=args.max_queue, request_timeout_s=args.request_timeout_s)
    thread = threading.Thread(target=server.serve_forever, name="knnlm-serve", daemon=True)
    thread.start()
    log.info("serving %s at %s", engine.name, server.url)
    return server, thread
