"""`knnlm serve`: a minimal OpenAI-compatible completions endpoint with log-probabilities over a local HF model.

``POST /v1/completions`` takes ``model``, ``prompt`` (a string, a list of strings, a list of token ids or a list of such
lists), ``max_tokens`` (0 allowed with ``echo``), ``echo``, ``logprobs`` (int: how many alternatives per position),
``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop`` (strings that end the generated text, which excludes them),
``n`` (choices per prompt, up to ``--max_n``), ``best_of`` (only equal to ``n``) and ``stream`` (server-sent events in
the OpenAI chunk format, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk). Each choice
carries ``logprobs`` = ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset`` as the legacy OpenAI API and
vLLM return them: with ``echo`` the prompt's tokens come first, the first one with a null log-probability (nothing
predicts it). ``frequency_penalty``, ``presence_penalty``, ``logit_bias`` and ``suffix`` are refused with a 400 unless
they are their neutral value. ``GET /v1/models`` lists the one served model.

Completions come from the model's own ``generate`` (the sampling path of ``knnlm generate``): greedy, or sampling with
temperature and nucleus (``top_p``) from the distribution the model's logits define, with none of the model's own
``generation_config`` sampling settings (top-k, repetition penalty...) applied. Log-probabilities are the model's raw
``log_softmax`` (float32), independent of ``temperature`` and ``top_p``. With a model augmented by
:func:`knnlm.augmented.augment` (``knnlm serve --datastore``) they are log p_knnlm, and generation samples from it.

Token texts are detokenized incrementally: a token that ends inside a multi-byte character adds ``""`` and the token
completing the character carries all of it, so the tokens of a choice always join to its text.
The HTTP side (connections, capacity, graceful stop, :func:`start_server`) is :mod:`knnlm.serve_http`.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import THREAD_LIMIT, KnnlmError, require_finite, require_in_range

log = logging.getLogger(__name__)

_DETOK_WINDOW = 6  # tokens of left context a prompt-less choice decodes its first token with
MIN_TEMPERATURE = 1e-5  # below this (but > 0) logits / T overflow; 0 means greedy (vLLM's _SAMPLING_EPS)
# --request_timeout_s at most: a client silent for a day is gone (and socket.settimeout overflows past ~9.2e9 s)
MAX_REQUEST_TIMEOUT_S = 86400.0
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # torch seeds are 64-bit; this range maps one-to-one onto them
# OpenAI request fields this server does not implement, with the value that means "off" (accepted)
_REFUSED = {"frequency_penalty": (0, "penalising repeated tokens"), "presence_penalty": (0, "penalising present tokens"),
            "logit_bias": ({}, "biasing logits"), "suffix": ("", "insertion (a suffix)")}


@dataclass
class ServeArgs:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 127.0.0.1 keeps the server local (there is no TLS)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)."})
    served_model_name: Optional[str] = field(default=None, metadata={"help": "Model name clients send in `model` (default: --model_name_or_path)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "When set, requests must send `Authorization: Bearer <key>`."})
    max_logprobs: int = field(default=20, metadata={"help": "Largest `logprobs` a request may ask for."})
    max_n: int = field(default=16, metadata={"help": "Largest `n` (choices per prompt) a request may ask for."})
    workers: int = field(default=32, metadata={"help": "Threads serving requests (the model itself computes one request at a time); an idle keep-alive connection holds none."})
    max_queue: int = field(default=64, metadata={"help": "Requests that may wait for a worker; beyond workers + max_queue a request gets 503 with Retry-After."})
    request_timeout_s: float = field(default=30.0, metadata={"help": "Seconds a connection may stay silent (an idle keep-alive is closed; a body shorter than its Content-Length gets 408)."})
    shutdown_grace_s: float = field(default=10.0, metadata={"help": "On SIGTERM / SIGINT: seconds requests in flight may take to finish (no new connections are accepted, idle ones are closed at once)."})

    def validate(self) -> None:
        for name, fix in (("host", "pass 127.0.0.1 (local only) or 0.0.0.0 (every interface)"),
                          ("api_key", "pass a non-empty key, or leave the flag out for a server without one"),
                          ("served_model_name", "pass a name, or leave the flag out for --model_name_or_path")):
            if getattr(self, name) is not None and not getattr(self, name).strip():  # e.g. an unset "$KEY"
                raise KnnlmError(f"--{name}: empty; {fix}")
        if not 0 <= self.port <= 65535:
            raise KnnlmError(f"--port: {self.port} is not a TCP port; use 0-65535")
        if self.max_logprobs < 0:
            raise KnnlmError("--max_logprobs: must be >= 0")
        if self.max_n < 1:
            raise KnnlmError(f"--max_n: must be >= 1, got {self.max_n}")
        # every worker is a thread started at launch, and the model computes one request at a time anyway
        require_in_range("workers", self.workers, 1, THREAD_LIMIT)
        if self.max_queue < 0:
            raise KnnlmError(f"--max_queue: must be >= 0, got {self.max_queue}")
        require_finite("request_timeout_s", self.request_timeout_s, maximum=MAX_REQUEST_TIMEOUT_S)
        require_finite("shutdown_grace_s", self.shutdown_grace_s, inclusive=True)
        # a trial bind, so that an address or port the server cannot have is refused before the model loads
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (allow_reuse_address)
            try:
                s.bind((self.host, self.port))
            except OSError as e:
                raise bind_error(self.host, self.port, e) from None


def bind_error(host: str, port: int, e: OSError) -> KnnlmError:
    """The error for a failed bind of ``host:port``: a name that does not resolve, or an address that is not this
    machine's, is the fault of --host; anything else (in use, a privileged port) of --port."""
    if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
        return KnnlmError(f"--host: cannot bind {host}:{port} ({e.strerror}); pass an IPv4 address of this machine or "
                          "a name that resolves to one (127.0.0.1: local only, 0.0.0.0: every interface)")
    return KnnlmError(f"--port: cannot bind {host}:{port} ({e.strerror}); pick another port or stop the process using "
                      "it")


class ApiError(Exception):
    """A request the server refuses, answered as an OpenAI-style error body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Request:
    """A parsed, checked ``/v1/completions`` body."""
    prompts: list[list[int]]
    max_tokens: int = 16
    logprobs: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    echo: bool = False
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False


# ------------------------------------------------------------------------------------------------------- detokenizing
class Detokenizer:
    """The text each new token adds to a sequence's decoded text (special tokens add '').

    Decodes a short window ``ids[prefix:]`` against ``ids[prefix:read]`` (so tokenizers that strip a leading space see
    the same context on both sides) and holds text back while it ends in U+FFFD: a token ending inside a multi-byte
    character adds '' and the token that completes the character adds all of it."""

    def __init__(self, decode: Callable[[list[int]], str], context: list[int] = ()):
        self.decode, self.ids = decode, list(context)
        self.read = len(self.ids)  # ids up to here have given their text
        self.prefix = max(0, self.read - _DETOK_WINDOW)  # decoding starts here

    def copy(self) -> "Detokenizer":
        twin = Detokenizer(self.decode)
        twin.ids, twin.read, twin.prefix = list(self.ids), self.read, self.prefix
        return twin

    @property
    def pending(self) -> bool:
        """Whether tokens have arrived whose text is held back (an incomplete character so far)."""
        return self.read < len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        new = self.decode(self.ids[self.prefix:])
        if new.endswith("\ufffd"):
            return ""
        return self._advance(new)

    def flush(self) -> str:
        """What held-back tokens add, incomplete characters included (the end of the sequence)."""
        return self._advance(self.decode(self.ids[self.prefix:])) if self.pending else ""

    def _advance(self, new: str) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        common = len(before) if new.startswith(before) else _common_prefix(before, new)
        self.prefix, self.read = self.read, len(self.ids)
        return new[common:]


def _common_prefix(a: str, b: str) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not yet known to be output)."""
    best = 0
    for st in stops:
        for k in range(min(len(st) - 1, len(text)), best, -1):
            if text.endswith(st[:k]):
                best = k
                break
    return best


# ------------------------------------------------------------------------------------------------------------ choices
class Choice:
    """One choice of a completion, built token by token: its pieces (text, log-prob, top alternatives per token) and
    how many of them are final. Streaming sends the final pieces as they come; both paths build the same pieces."""

    def __init__(self, engine: "CompletionEngine", index: int, ids: list[int], req: Request):
        self.engine, self.index, self.req = engine, index, req
        self.detok = Detokenizer(engine.decode, [] if req.echo else ids)
        self.texts: list[str] = []  # one per token: echoed prompt tokens first, then generated ones
        self.lps: list[Optional[float]] = []
        self.tops: list[Optional[dict]] = []
        self.n_echo = 0  # pieces that are the echoed prompt
        self.ready = 0  # pieces that can no longer change
        self.sent = 0  # pieces streamed so far
        self.finish_reason: Optional[str] = None
        self._reported = False

    @property
    def n_new(self) -> int:
        return len(self.texts) - self.n_echo

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def echo(self, ids: list[int], logp: Optional[torch.Tensor]) -> None:
        """The prompt's pieces; ``logp`` [T, V]: the log-probs at each prompt position (None without logprobs)."""
        for t, tok in enumerate(ids):
            self.texts.append(self.detok.push(tok))
            first = t == 0 or logp is None
            self.lps.append(None if first else float(logp[t - 1, tok]))
            self.tops.append(None if first else self.engine.top_dict(logp[t - 1], tok, self.req.logprobs))
        self.n_echo = len(ids)
        self._settle()

    def echo_as(self, other: "Choice") -> None:
        """The echoed prompt of ``other`` (another choice of the same prompt), without decoding it again."""
        self.texts, self.lps, self.tops = list(other.texts), list(other.lps), list(other.tops)
        self.detok, self.n_echo, self.ready = other.detok.copy(), other.n_echo, other.ready

    def add(self, tok: int, logp: torch.Tensor) -> None:
        """One generated token; ``logp`` [V]: the log-probs of the distribution it was chosen from."""
        self.texts.append(self.detok.push(tok))
        want = self.req.logprobs
        self.lps.append(float(logp[tok]) if want is not None else None)
        self.tops.append(self.engine.top_dict(logp, tok, want) if want is not None else None)
        if tok in self.engine.lm.stop_token_ids:
            self.finish("stop")
        else:
            self._settle()

    def finish(self, reason: str = "length") -> None:
        """The end of generation (EOS, max_tokens, or no generation at all); a choice cut at a stop string has ended
        already (held-back bytes lie after the cut)."""
        if self.finished:
            return
        rest = self.detok.flush()
        if rest and self.texts:
            self.texts[-1] += rest
        self.finish_reason = reason
        self._settle()

    def _settle(self) -> None:
        """Cuts the text at the first stop string (which ends the choice) and moves ``ready`` up to the pieces no
        later token can change: not a piece with held-back bytes, nor text that may begin a stop string.

        One rule for both: a piece belongs before a cut at ``c`` when it starts before ``c`` (the one across ``c``
        clipped). A piece of no text (bytes of a character a later token completes) starts where that character
        does, so one at ``c`` is the stop string's, and one where the held-back text begins is not final: streamed,
        it could be cut from the whole answer afterwards."""
        stops, gen = self.req.stop, self.texts[self.n_echo:]
        text = "".join(gen)
        cut = min((i for i in (text.find(st) for st in stops) if i >= 0), default=None)
        if cut is not None:  # the text ends before the stop string; the tokens up to it stay, the last one clipped
            kept, pos = [], 0
            for piece in gen:
                if pos >= cut:
                    break
                kept.append(piece[: cut - pos])
                pos += len(piece)
            end = self.n_echo + len(kept)
            self.texts[self.n_echo:] = kept
            del self.lps[end:], self.tops[end:]
            self.finish_reason = "stop"
        if self.finished:
            self.ready = len(self.texts)
            return
        limit, pos, ready = len(text) - _holdback(text, stops), 0, self.n_echo
        for piece in gen:
            if pos >= limit or pos + len(piece) > limit:
                break
            pos += len(piece)
            ready += 1
        if self.detok.pending and ready == len(self.texts):
            ready -= 1  # the last piece still gets the rest of its character
        self.ready = max(self.ready, ready)

    def _logprobs(self, lo: int, hi: int) -> Optional[dict]:
        if self.req.logprobs is None:
            return None
        start = sum(len(t) for t in self.texts[:lo])
        offsets = []
        for piece in self.texts[lo:hi]:
            offsets.append(start)
            start += len(piece)
        return {"tokens": self.texts[lo:hi], "token_logprobs": self.lps[lo:hi], "top_logprobs": self.tops[lo:hi],
                "text_offset": offsets}

    def result(self) -> dict:
        """The whole choice (a non-streamed response)."""
        return {"index": self.index, "text": "".join(self.texts), "logprobs": self._logprobs(0, len(self.texts)),
                "finish_reason": self.finish_reason}

    def chunk(self) -> Optional[dict]:
        """The pieces that became final since the last chunk (and the finish reason once all are), or None."""
        lo, hi = self.sent, self.ready
        done = self.finished and hi == len(self.texts) and not self._reported
        if hi == lo and not done:
            return None
        self.sent, self._reported = hi, self._reported or done
        return {"index": self.index, "text": "".join(self.texts[lo:hi]), "logprobs": self._logprobs(lo, hi),
                "finish_reason": self.finish_reason if done else None}


# ------------------------------------------------------------------------------------------------------------ engine
class CompletionEngine:
    """Answers completion requests with one local LM (``knnlm.models.LM``). One request computes at a time."""

    def __init__(self, lm, name: str | None = None, max_logprobs: int = 20, max_n: int = 16):
        self.lm, self.name, self.max_logprobs, self.max_n = lm, name or lm.name, max_logprobs, max_n
        self.created = int(time.time())
        self.abort = threading.Event()  # set by a server that stops: generation ends at the next token
        self._lock = threading.Lock()

    # -- tokens <-> text
    def decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def top_dict(self, logp: torch.Tensor, chosen: int, n: int) -> dict[str, float]:
        """The ``n`` most likely tokens at one position plus the chosen one, as {token text: log-prob}, most likely
        first. A token whose text is not its own (bytes of an unfinished character decode to '\ufffd') or is another's
        already (a second special token: '') is keyed ``token_id:<id>`` (vLLM's form): keyed by text, the later, less likely
        token overwrote the earlier, so the top value was not the top token's and clients that read greediness from
        ``max(top_logprobs)`` (lm-evaluation-harness) were told a non-argmax token was greedy."""
        top = torch.topk(logp, min(n, logp.numel())).indices.tolist() if n > 0 else []
        if chosen not in top:
            top.append(chosen)
        out: dict[str, float] = {}
        for t in top:
            text = self.decode([t])
            key = text if "\ufffd" not in text and text not in out else f"token_id:{t}"
            out[key] = float(logp[t])
        return out

    # -- model
    @torch.no_grad()
    def _prompt_log_probs(self, ids: list[int]) -> torch.Tensor:
        """log_softmax of the model's logits at every prompt position: [T, V] float32 on the CPU."""
        x = torch.tensor([ids], dtype=torch.long, device=self.lm.device)  # [1, T]
        logits = self.lm.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]  # [T, V]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _generation_config(self, req: Request):
        from .augmented import GenerateArgs

        sampling = GenerateArgs(max_new_tokens=req.max_tokens, do_sample=req.temperature > 0,
                                temperature=req.temperature or 1.0, top_k=0, top_p=req.top_p)
        return sampling.generation_config(self.lm)

    @torch.no_grad()
    def _generate(self, ids: list[int], req: Request, group: list[Choice], emit) -> None:
        """``model.generate`` for the ``len(group)`` choices of one prompt (a batch of copies); each new token goes to
        its choice as it is chosen, with the log-probs of the distribution it came from (a forward hook reads them).
        A choice that meets a stop string ends there while the others go on."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        from .augmented import generate

        step = {}

        def record(module, args, out):  # registered after any augmentation hook: sees log p_knnlm
            step["logp"] = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [n, V]

        engine = self

        class Feed(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # input_ids [n, T + t]: the new tokens are the last
                logp, done = step.pop("logp"), []
                for i, (choice, tok) in enumerate(zip(group, input_ids[:, -1].tolist())):
                    if not choice.finished:
                        choice.add(tok, logp[i])
                        if emit is not None:
                            emit(choice)
                    done.append(choice.finished or engine.abort.is_set())
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        x = torch.tensor([ids] * len(group), dtype=torch.long, device=self.lm.device)  # [n, T]
        if req.seed is not None:
            torch.manual_seed(req.seed)
        else:
            torch.seed()
        hook = self.lm.model.register_forward_hook(record)
        try:
            generate(self.lm, x, self._generation_config(req), stopping_criteria=StoppingCriteriaList([Feed()]))
        finally:
            hook.remove()

    # -- request
    def _prompts(self, prompt) -> list[list[int]]:
        """Normalises ``prompt`` to a list of token-id lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, "`prompt` must be a string, a list of strings or a list of token-id lists", "prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                _check_unicode(p, "prompt")
                out.append(list(self.lm.encode(p)))
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < self.lm.vocab_size for t in p):
                out.append(list(p))
            else:
                raise ApiError(400, "each prompt must be a non-empty string or a non-empty list of valid token ids", "prompt")
            if not out[-1]:
                raise ApiError(400, "a prompt encodes to no tokens", "prompt")
        return out

    def parse(self, body) -> Request:
        """Checks a request body; every problem is an ApiError (4xx) raised before any computation."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", "model")
        if model is not None and model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", "model",
                           "NotFoundError")
        for name, (off, what) in _REFUSED.items():
            if body.get(name) not in (None, off):
                raise ApiError(400, f"`{name}`: {what} is not supported by knnlm serve; leave it out (or {json.dumps(off)})",
                               name)
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
        top_p = float(_field(body, "top_p", float, 1.0))
        if not 0 < top_p <= 1:
            raise ApiError(400, f"`top_p` must be in (0, 1], got {top_p}", "top_p")
        echo = _field(body, "echo", bool, False)
        if not echo and max_tokens == 0:
            raise ApiError(400, "max_tokens=0 returns nothing without echo=true", "max_tokens")
        n = _field(body, "n", int, 1)
        if not 1 <= n <= self.max_n:
            raise ApiError(400, f"`n` must be an integer in [1, {self.max_n}] (knnlm serve --max_n), got {n}", "n")
        best_of = _field(body, "best_of", int, None)
        if best_of is not None and best_of != n:
            raise ApiError(400, f"`best_of` = {best_of} with n = {n}: choosing the best of extra candidates is not "
                                "supported; leave best_of out (or equal to n)", "best_of")
        stream = _field(body, "stream", bool, False)
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise ApiError(400, "`stream_options` must be an object, and is only allowed with stream=true",
                           "stream_options")
        include_usage = _field(options or {}, "include_usage", bool, False)
        seed = _field(body, "seed", int, None)
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ApiError(400, f"`seed` must be a 64-bit signed integer (from -2**63 to 2**63 - 1), got "
                                f"{str(seed)[:30]}", "seed")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(x, str) and x for x in stop):
            raise ApiError(400, "`stop` must be a non-empty string or a list of at most 16 of them", "stop")
        for st in stop:
            _check_unicode(st, "stop")
        prompts = self._prompts(body.get("prompt"))
        n_ctx = self.lm.max_positions
        for ids in prompts:
            if len(ids) + max_tokens > n_ctx:
                raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has "
                                    f"{len(ids)} and max_tokens is {max_tokens}", "prompt")
        return Request(prompts=prompts, max_tokens=max_tokens, logprobs=logprobs, temperature=temperature, top_p=top_p,
                       echo=echo, seed=seed, stop=stop, n=n, stream=stream, include_usage=include_usage)

    def run(self, req: Request, emit: Optional[Callable[[Choice], None]] = None) -> list[Choice]:
        """Computes every choice (prompt by prompt, ``n`` each; index = prompt * n + j). ``emit(choice)`` is called
        whenever a choice may have new final pieces (streaming); it runs with the model held."""
        out = []
        with self._lock:
            for p, ids in enumerate(req.prompts):
                group = [Choice(self, p * req.n + j, ids, req) for j in range(req.n)]
                if req.echo:
                    logp = self._prompt_log_probs(ids) if req.logprobs is not None else None  # [T, V]
                    group[0].echo(ids, logp)
                    for choice in group:
                        if choice is not group[0]:
                            choice.echo_as(group[0])
                        if emit is not None:
                            emit(choice)
                if req.max_tokens and not self.abort.is_set():
                    self._generate(ids, req, group, emit)
                for choice in group:
                    choice.finish()
                    if emit is not None:
                        emit(choice)
                out += group
        return out

    def response(self, req: Request, choices: list[Choice]) -> dict:
        """The response body of a non-streamed request."""
        return {**self.chunk_head(), "choices": [c.result() for c in choices], "usage": self.usage(req, choices)}

    def chunk_head(self, cid: str | None = None) -> dict:
        return {"id": cid or f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}

    @staticmethod
    def usage(req: Request, choices: list[Choice]) -> dict:
        n_prompt, n_new = sum(len(ids) for ids in req.prompts), sum(c.n_new for c in choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    def complete(self, body: dict) -> dict:
        """One non-streamed ``/v1/completions`` request body -> the response body (raises ApiError on a bad request)."""
        req = self.parse(body)
        if req.stream:
            raise ApiError(400, "stream=true needs the HTTP server (knnlm serve)", "stream")
        return self.response(req, self.run(req))

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
    if kind is float and not math.isfinite(float(value)):
        raise ApiError(400, f"`{name}` must be a finite number, got {value}", name)
    return value


def _check_unicode(text: str, name: str) -> None:
    """A JSON string may hold a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"`{name}` holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
                            "which is not a character; send valid Unicode (pair it or drop it)", name) from None


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
