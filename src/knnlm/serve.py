"""`knnlm serve`: a minimal OpenAI-compatible completions endpoint with log-probabilities over a local HF model.

``POST /v1/completions`` takes ``model``, ``prompt`` (a string, a list of strings, a list of token ids or a list of such
lists), ``max_tokens`` (0 allowed), ``echo``, ``logprobs`` (int: how many alternatives per position), ``temperature``
(0 = greedy) and ``seed``. Each choice carries ``logprobs`` = ``tokens``, ``token_logprobs``, ``top_logprobs`` and
``text_offset`` as the legacy OpenAI API and vLLM return them: with ``echo`` the prompt's tokens come first, the first
one with a null log-probability (nothing predicts it). ``GET /v1/models`` lists the one served model.

Log-probabilities are the model's raw ``log_softmax`` (float32), independent of ``temperature``. The server is meant for
local scoring: it binds 127.0.0.1 by default and checks a bearer key only when one is set.
"""
from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch

from .errors import KnnlmError

log = logging.getLogger(__name__)

_DETOK_WINDOW = 6  # tokens of left context used to decode one token's text (incremental detokenization)


@dataclass
class ServeArgs:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 127.0.0.1 keeps the server local (there is no TLS)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)."})
    served_model_name: Optional[str] = field(default=None, metadata={"help": "Model name clients send in `model` (default: --model_name_or_path)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "When set, requests must send `Authorization: Bearer <key>`."})
    max_logprobs: int = field(default=20, metadata={"help": "Largest `logprobs` a request may ask for."})

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise KnnlmError(f"--port: {self.port} is not a TCP port; use 0-65535")
        if self.max_logprobs < 0:
            raise KnnlmError("--max_logprobs: must be >= 0")


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
    def _generate(self, ids: list[int], max_tokens: int, temperature: float, seed: int | None):
        """Greedy (temperature 0) or sampled continuation: (new ids, [n, V] log-probs of each step's distribution)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        x = torch.tensor([ids], dtype=torch.long, device=self.lm.device)  # [1, T]
        past, new, steps = None, [], []
        eos = self.lm.eos_token_id
        for _ in range(max_tokens):
            out = self.lm.model(input_ids=x, use_cache=True, **{self._cache_kw: past})
            past = getattr(out, self._cache_kw)
            logits = out.logits[0, -1].float().cpu()  # [V]
            logp = torch.log_softmax(logits, dim=-1)
            if temperature == 0:
                tok = int(torch.argmax(logits))
            else:
                tok = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
            new.append(tok)
            steps.append(logp)
            if tok == eos:
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
        if all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((p, list(self.lm.encode(p))))
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < self.lm.vocab_size for t in p):
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
        if model is not None and model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", "model",
                           "NotFoundError")
        max_tokens = body.get("max_tokens", 16)
        max_tokens = 16 if max_tokens is None else max_tokens
        logprobs = body.get("logprobs")
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else temperature
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ApiError(400, "`max_tokens` must be an integer >= 0", "max_tokens")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= self.max_logprobs):
            raise ApiError(400, f"`logprobs` must be an integer in [0, {self.max_logprobs}]", "logprobs")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ApiError(400, "`temperature` must be a number >= 0", "temperature")
        if body.get("n", 1) != 1 or body.get("stream"):
            raise ApiError(400, "only n=1 without streaming is supported", "n")
        if not body.get("echo") and max_tokens == 0:
            raise ApiError(400, "max_tokens=0 returns nothing without echo=true", "max_tokens")
        seed = body.get("seed")
        return {"prompts": self._prompts(body.get("prompt")), "max_tokens": max_tokens, "logprobs": logprobs,
                "temperature": float(temperature), "echo": bool(body.get("echo")),
                "seed": seed if isinstance(seed, int) else None}

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
        new, steps = self._generate(ids, req["max_tokens"], req["temperature"], req["seed"]) if req["max_tokens"] else ([], [])
        new_texts = self.token_texts(new, context=ids)
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
        finish = "stop" if new and new[-1] == self.lm.eos_token_id else "length"
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
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                             "owned_by": "knnlm", "max_model_len": self.lm.max_positions}]}


# ------------------------------------------------------------------------------------------------------------ HTTP
class _Handler(BaseHTTPRequestHandler):
    server_version = "knnlm-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route http.server's access log through logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, ApiError(401, "missing or wrong API key", kind="authentication_error").body())
            return False
        return True

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
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self._authorized():
            return
        if path != "/v1/completions":
            self._send(404, ApiError(404, f"no route POST {path}; this server offers /v1/completions",
                                     kind="not_found_error").body())
            return
        try:
            body = json.loads(raw or b"null")
            self._send(200, self.server.engine.complete(body))
        except json.JSONDecodeError:
            self._send(400, ApiError(400, "the request body is not valid JSON").body())
        except ApiError as e:
            self._send(e.status, e.body())
        except Exception as e:  # a bug or an out-of-memory: answer 500 and keep serving
            log.exception("completion failed")
            self._send(500, ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body())


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: CompletionEngine, host: str, port: int, api_key: str | None = None):
        self.engine, self.api_key = engine, api_key
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise KnnlmError(f"--port: cannot bind {host}:{port} ({e.strerror}); pick another port or stop the "
                             "process using it") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def start_server(lm, args: ServeArgs) -> tuple[CompletionServer, threading.Thread]:
    """Starts serving ``lm`` in a background thread; stop with ``server.shutdown(); server.server_close()``."""
    engine = CompletionEngine(lm, args.served_model_name, args.max_logprobs)
    server = CompletionServer(engine, args.host, args.port, args.api_key)
    thread = threading.Thread(target=server.serve_forever, name="knnlm-serve", daemon=True)
    thread.start()
    log.info("serving %s at %s", engine.name, server.url)
    return server, thread
