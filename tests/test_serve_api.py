"""`knnlm serve` (OpenAI-compatible completions with logprobs) and `knnlm overspec api` (Macondo-Conv via an API).

Every server here binds 127.0.0.1 on a free port and is shut down at the end. The fine-tuning endpoints are a local
test double (``_StubApi``) of the remote API's /v1/files and /v1/fine_tuning/jobs; its /v1/completions is answered by
the same ``CompletionEngine`` that ``knnlm serve`` uses.
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import gzip
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm import openai_client as OC
from knnlm.experiments.overspec import api as A
from knnlm.serve import CompletionEngine, ServeArgs
from knnlm.serve_http import start_server

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ helpers
def _post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@torch.no_grad()
def _log_softmax(lm, ids: list[int]) -> torch.Tensor:
    """The model's own next-token log-probabilities at every position: [T, V]."""
    logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_lm):
    srv, thread = start_server(tiny_lm, ServeArgs(port=0))
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def village(tmp_path_factory):
    from knnlm.macondo.generate import MacondoArgs, generate_macondo

    out = tmp_path_factory.mktemp("conv") / "village"
    return generate_macondo(MacondoArgs(output_dir=str(out), seed=3, format="conv", tokenizer="gpt2",
                                        num_villagers=30, num_parents=4, examples_per_child=1))


# ------------------------------------------------------------------------------------------------------------ serve
PROMPTS = ["User: Who is the child of Sal Gougis? Assistant: Meta", "h\u00e9llo w\u00f6rld, the cat sat"]


def test_echo_logprobs_equal_log_softmax(server, tiny_lm):
    assert server.server_address[0] == "127.0.0.1"
    status, r = _post(server.url + "/completions", {"model": tiny_lm.name, "prompt": PROMPTS, "echo": True,
                                                   "max_tokens": 0, "logprobs": 2, "temperature": 0})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1]
    for prompt, choice in zip(PROMPTS, r["choices"]):
        ids = tiny_lm.encode(prompt)
        ref = _log_softmax(tiny_lm, ids)  # [T, V]
        lp = choice["logprobs"]
        assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt and len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
        for t in range(1, len(ids)):
            assert lp["token_logprobs"][t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-5)
            top2 = torch.topk(ref[t - 1], 2).indices.tolist()
            want = {tiny_lm.tokenizer.decode([i]): float(ref[t - 1, i]) for i in top2 + [ids[t]]}
            assert lp["top_logprobs"][t] == pytest.approx(want, abs=1e-5)
    assert r["usage"]["prompt_tokens"] == sum(len(tiny_lm.encode(p)) for p in PROMPTS)
    assert r["usage"]["completion_tokens"] == 0


def test_greedy_generation_and_token_id_prompt(server, tiny_lm):
    ids = tiny_lm.encode("the cat sat on")
    status, r = _post(server.url + "/completions", {"model": tiny_lm.name, "prompt": ids, "max_tokens": 3,
                                                   "logprobs": 0, "temperature": 0, "echo": True})
    assert status == 200
    lp, seq, want_lps = r["choices"][0]["logprobs"], list(ids), []
    for _ in range(3):  # greedy chain recomputed without a KV cache
        ref = _log_softmax(tiny_lm, seq)[-1]
        nxt = int(torch.argmax(ref))
        want_lps.append(float(ref[nxt]))
        seq.append(nxt)
    assert lp["token_logprobs"][len(ids):] == pytest.approx(want_lps, abs=1e-5)
    assert r["choices"][0]["text"] == tiny_lm.tokenizer.decode(seq)
    assert lp["top_logprobs"][-1] == pytest.approx({tiny_lm.tokenizer.decode([seq[-1]]): want_lps[-1]}, abs=1e-5)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 3, "total_tokens": len(ids) + 3}
    # the same seed gives the same sample
    body = {"model": tiny_lm.name, "prompt": "the", "max_tokens": 4, "temperature": 1.0, "seed": 7}
    assert _post(server.url + "/completions", body)[1]["choices"][0]["text"] == \
        _post(server.url + "/completions", body)[1]["choices"][0]["text"]


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "other", "prompt": "a", "max_tokens": 1}, 404, "does not exist"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens=0"),
    ({"prompt": "a", "echo": True, "max_tokens": 0, "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": [], "max_tokens": 1}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 10_000}, 400, "maximum context length"),
    (b"{not json", 400, "not valid JSON"),
])
def test_bad_requests(server, body, status, needle):
    got, r = _post(server.url + "/completions", body)
    assert got == status and needle in r["error"]["message"]


def test_port_in_use_is_a_one_line_error(server, tiny_lm):
    """Binding a port another server holds: the --port error (socketserver's cleanup after a failed bind used to hit
    the server's half-made state and hide it behind an AttributeError)."""
    with pytest.raises(KnnlmError, match=r"^--port: cannot bind 127\.0\.0\.1:\d+ \(Address already in use\); pick"):
        start_server(tiny_lm, ServeArgs(port=server.server_address[1]))


def test_models_route_and_api_key(tiny_lm):
    srv, thread = start_server(tiny_lm, ServeArgs(port=0, served_model_name="tiny", api_key="k1"))
    try:
        assert _get(srv.url + "/models")[0] == 401
        req = urllib.request.Request(srv.url + "/models", headers={"Authorization": "Bearer k1"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]
        assert _post(srv.url + "/completions", {"prompt": "a", "max_tokens": 1})[0] == 401
        for auth, ok in (("bearer k1", True), ("BEARER  k1", True), ("Basic k1", False), ("Bearer k2", False)):
            req = urllib.request.Request(srv.url + "/models", headers={"Authorization": auth})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    assert ok and r.status == 200, auth
            except urllib.error.HTTPError as e:
                assert not ok and e.code == 401, auth
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------ serve: bad input, load
def _raw(url: str, data: bytes, read_timeout: float = 30) -> tuple[int, dict, dict]:
    """Sends raw bytes to the server of ``url``; -> (status, JSON body, headers) of its answer."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer after {buf!r}"
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = s.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
    return int(lines[0].split()[1]), json.loads(body), headers


def _request(body: bytes, length: str | None = "auto", method: str = "POST", path: str = "/v1/completions") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if length == "auto":
        length = str(len(body))
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize("data,status,needle", [
    (_request(b'{"prompt": "a", "temperature": NaN}'), 400, "NaN is not valid JSON"),
    (_request(b'{"prompt": "a", "temperature": Infinity}'), 400, "Infinity"),
    (_request(b'{"prompt": "a", "temperature": 1e400}'), 400, "finite"),
    (_request(b'{"prompt": "a", "temperature": 1e-310}'), 400, "use 0 for greedy"),
    (_request(b'{"prompt": "a", "temperature": -1}'), 400, "temperature"),
    (_request(b'{"prompt": "caf\xe9"}'), 400, "not UTF-8"),
    (_request(b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply"),
    (_request(b'{"prompt": "a"}', length="abc"), 400, "Content-Length"),
    (_request(b'{"prompt": "a"}', length="-5"), 400, "Content-Length"),
    (_request(b'{"prompt": "a"}', length=None), 411, "Content-Length"),
    (_request(b'{"prompt": "a"}', length=str(1 << 30)), 413, "exceeds"),
    (_request(b'{"prompt": "a", "max_tokens": "3"}'), 400, "`max_tokens` must be an integer"),
    (_request(b'{"prompt": "a", "max_tokens": 1.5}'), 400, "max_tokens"),
    (_request(b'{"prompt": "a", "echo": "yes"}'), 400, "`echo` must be true or false"),
    (_request(b'{"prompt": "a", "seed": "x"}'), 400, "`seed` must be an integer"),
    (_request(b'{"prompt": "a", "echo": true, "logprobs": true}'), 400, "`logprobs` must be an integer"),
    (_request(b'{"prompt": [true, false]}'), 400, "prompt"),
    (_request(b'{"prompt": "a", "model": 5}'), 400, "`model` must be a string"),
    (_request(b'{"prompt": "a", "n": "2"}'), 400, "`n`"),
    (_request(b'{"prompt": "a\\ud800b", "max_tokens": 1}'), 400, "`prompt` holds a lone surrogate (U+D800 at character 1)"),
    (_request(b'{"prompt": "a", "stop": ["\\udfff"]}'), 400, "`stop` holds a lone surrogate"),
    (_request(b'{"prompt": "a", "seed": 1180591620717411303424}'), 400, "`seed` must be a 64-bit signed integer"),
    (_request(b'{"prompt": "a", "seed": -9223372036854775809}'), 400, "`seed` must be a 64-bit signed integer"),
    (_request(b'{"prompt": "a", "top_p": 0}'), 400, "`top_p` must be in (0, 1]"),
    (_request(b'{"prompt": "a", "top_p": 1.5}'), 400, "`top_p` must be in (0, 1]"),
    (_request(b'{"prompt": "a", "frequency_penalty": 1.5}'), 400, "`frequency_penalty`: penalising repeated tokens is not supported"),
    (_request(b'{"prompt": "a", "presence_penalty": -1}'), 400, "`presence_penalty`"),
    (_request(b'{"prompt": "a", "logit_bias": {"50256": -100}}'), 400, "`logit_bias`"),
    (_request(b'{"prompt": "a", "suffix": "end"}'), 400, "`suffix`"),
    (_request(b'{"prompt": "a", "best_of": 3}'), 400, "`best_of` = 3 with n = 1"),
    (_request(b'{"prompt": "a", "n": 17}'), 400, "`n` must be an integer in [1, 16] (knnlm serve --max_n), got 17"),
    (_request(b'{"prompt": "a", "n": 0}'), 400, "`n` must be an integer in [1, 16]"),
    (_request(b'{"prompt": "a", "stream_options": {"include_usage": true}}'), 400, "only allowed with stream=true"),
    (_request(b'"just a string"'), 400, "JSON object"),
    (_request(b'{"prompt": "a"}', method="PUT"), 405, "not allowed"),
    (_request(b"", method="TRACE"), 405, "method TRACE is not allowed"),  # these three got the base class's 501
    (_request(b"", method="CONNECT"), 405, "not allowed"),
    (_request(b"", method="FOO"), 405, "not allowed"),
    (_request(b'{"prompt": "a"}').replace(b"Content-Length: 15", b"Content-Length: 15\r\nContent-Length: 5"), 400,
     "2 different Content-Length headers"),  # was served by the first after --request_timeout_s (smuggling)
    (b"GARBAGE\r\n\r\n", 400, "Bad request"),
    (_request(b'{"prompt": "a"}').replace(b"Content-Length: 15", b"Content-Length: \xb2"), 400,
     "is not a non-negative integer"),  # '\u00b2'.isdigit(): int() raised and the connection closed without an answer
    (_request(gzip.compress(b'{"prompt": "a"}')).replace(b"Connection", b"Content-Encoding: gzip\r\nConnection"), 415,
     "Content-Encoding 'gzip' is not supported"),  # was "the request body is not UTF-8 (byte 1)"
])
def test_malformed_requests_get_4xx_json(server, data, status, needle):
    got, body, _ = _raw(server.url, data)
    assert got == status and needle in body["error"]["message"], body
    assert _post(server.url + "/completions", {"prompt": "a", "max_tokens": 1})[0] == 200  # still serving


def test_top_logprobs_keys_are_unique_and_most_likely_first(tiny_lm):
    """Before: keyed by each token's text, the byte tokens (255 of GPT-2's decode to '\ufffd') and special tokens
    ('') shared keys and the later, less likely one overwrote the earlier: max(top_logprobs) was not the top token's.
    A logprobs above the vocabulary size raised (torch.topk) where every token is what it can give."""
    from knnlm.serve import CompletionEngine

    engine = CompletionEngine(tiny_lm)
    V = tiny_lm.vocab_size
    partial = [t for t in range(V) if tiny_lm.tokenizer.decode([t]) == "\ufffd"][:2]
    assert len(partial) == 2
    word = tiny_lm.encode(" the")[0]
    logp = torch.full((V,), -30.0)
    logp[partial[0]], logp[partial[1]], logp[word], logp[tiny_lm.eos_token_id] = -1.0, -2.0, -3.0, -4.0
    top = engine.top_dict(logp, chosen=partial[1], n=4)
    assert list(top.values()) == [-1.0, -2.0, -3.0, -4.0]
    # a special token keeps its text ('') where no other token has it: tokens[i] is '' for it, and clients that match
    # the chosen token's text against the top key (older lm-evaluation-harness) find it
    assert list(top) == [f"token_id:{partial[0]}", f"token_id:{partial[1]}", " the", ""]
    assert len(engine.top_dict(torch.log_softmax(torch.randn(V), 0), chosen=0, n=V + 5)) == V


def test_logprobs_beyond_max_logprobs_is_a_clear_400(server):
    got, r = _post(server.url + "/completions", {"prompt": "a b", "echo": True, "max_tokens": 0, "logprobs": 21})
    assert got == 400 and r["error"]["param"] == "logprobs"
    assert "exceeds this server's limit of 20 (knnlm serve --max_logprobs)" in r["error"]["message"]


def test_short_body_times_out_with_408(tiny_lm):
    srv, thread = start_server(tiny_lm, ServeArgs(port=0, request_timeout_s=0.5))
    try:
        got, body, _ = _raw(srv.url, _request(b'{"prompt": "a"}', length="100"))  # 15 of 100 bytes, then silence
        assert got == 408 and "15 of the 100 bytes" in body["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_beyond_capacity_gets_503_with_retry_after(tiny_lm):
    srv, thread = start_server(tiny_lm, ServeArgs(port=0, workers=1, max_queue=1))
    engine, results = srv.engine, []
    try:
        with engine._lock:  # the model is busy: both slots (1 worker + 1 waiting) fill up
            first = [threading.Thread(target=lambda: results.append(_post(srv.url + "/completions",
                                                                          {"prompt": "a", "max_tokens": 1})))
                     for _ in range(2)]
            for t in first:
                t.start()
            for _ in range(200):
                if srv._slots._value == 0:
                    break
                threading.Event().wait(0.01)
            assert srv._slots._value == 0, "the two requests did not take both slots within 2 s"
            got, body, headers = _raw(srv.url, _request(b'{"prompt": "a", "max_tokens": 1}'))
            assert got == 503 and headers["retry-after"] == "1" and "at capacity" in body["error"]["message"]
        for t in first:
            t.join(timeout=30)
        assert [s for s, _ in results] == [200, 200] and srv.rejected == 1
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("clients,per_client", [
    (50, 4),
    pytest.param(50, 20, marks=pytest.mark.slow),  # ~40 s on two busy cores
])
def test_load_concurrent_clients_all_answered_identical_to_sequential(server, clients, per_client):
    """Concurrent clients x requests each: every request answered 200, each answer equal to the sequential one."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"the {w} sat on the mat" for w in ("cat", "dog", "bird", "fish", "man")]
    bodies = [{"prompt": p, "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0} for p in prompts]
    want = [_post(server.url + "/completions", b)[1]["choices"] for b in bodies]  # sequential answers

    def client(c: int) -> list:
        out = []
        for r in range(per_client):
            i = (c + r) % len(bodies)
            t0 = time.perf_counter()
            status, body = _post(server.url + "/completions", bodies[i])
            out.append((i, status, body.get("choices"), time.perf_counter() - t0))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for chunk in pool.map(client, range(clients)) for a in chunk]
    wall = time.perf_counter() - t0
    assert len(answers) == clients * per_client
    assert all(status == 200 for _, status, _, _ in answers)
    assert all(choices == want[i] for i, _, choices, _ in answers)
    lat = sorted(a[3] for a in answers)
    print(f"\nserve load: {clients} clients x {per_client} requests = {len(answers)}, answered {len(answers)}, "
          f"p50 {statistics.median(lat) * 1e3:.0f} ms, p99 {lat[int(0.99 * len(lat)) - 1] * 1e3:.0f} ms, "
          f"wall {wall:.1f} s ({len(answers) / wall:.0f} req/s)")


@pytest.mark.parametrize("argv,needle", [
    (["--datastore", "/nonexistent-store"], "--datastore: /nonexistent-store does not exist"),
    (["--workers", "0"], "--workers"),
    (["--max_queue", "-1"], "--max_queue"),
    (["--datastore", "x", "--mlp_memory", "y"], "pass one of them"),
    (["--lmbda", "1.5"], "--lmbda"),
    (["--datastore", "/nonexistent-store", "--lmbda", "1"], "--lmbda: 1 gives every token outside the neighbours"),
    (["--api_key", ""], "--api_key: empty"),  # it served without a key
    (["--host", ""], "--host: empty"),  # it bound every interface
    (["--served_model_name", " "], "--served_model_name: empty"),
])
def test_cli_serve_bad_arguments(tiny_gpt2_dir, argv, needle, capsys):
    from knnlm.cli import main

    code = main(["serve", "--model_name_or_path", str(tiny_gpt2_dir), "--port", "0", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and err.startswith("knnlm: error: ") and "\n" not in err


@pytest.mark.parametrize("host, needle", [
    ("999.1.1.1", "--host: cannot bind 999.1.1.1:{port} ("),  # does not resolve
    ("192.0.2.1", "--host: cannot bind 192.0.2.1:{port} (Cannot assign requested address)"),  # not this machine's
    ("127.0.0.1", "--port: cannot bind 127.0.0.1:{port} (Address already in use); pick another port"),
])
def test_cli_serve_an_address_it_cannot_bind_names_the_flag_at_fault_before_the_model_loads(host, needle, tmp_path,
                                                                                            capsys):
    from knnlm.cli import main

    with socket.socket() as taken:  # a port in use: the last case
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--model_name_or_path", str(tmp_path / "no-model"), "--host", host, "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("knnlm: error: " + needle.format(port=port)) and "\n" not in err, err
    if host != "127.0.0.1":
        assert err.endswith("pass an IPv4 address of this machine or a name that resolves to one (127.0.0.1: local "
                            "only, 0.0.0.0: every interface)")


def test_serve_datastore_logprobs_are_knnlm(tiny_gpt2_dir, tmp_path):
    """`knnlm serve --datastore`: echoed log-probs are log p_knnlm; /v1/models names the store, k, λ, T."""
    from knnlm.augmented import AugmentArgs, augment_from_args
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import build_datastore
    from knnlm.knn import KNNArgs, Retriever, interpolate
    from knnlm.models import ModelArgs, load_model

    lm = load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))
    (tmp_path / "train.txt").write_text("the cat sat on the mat. the dog sat on the log.\n" * 4)
    ds = build_datastore(lm, CorpusArgs(train_file=str(tmp_path / "train.txt"), block_size=32, stride=16),
                         tmp_path / "ds")
    ids = lm.encode("the dog sat on the mat")
    with torch.no_grad():
        logits, caps = lm.forward(torch.tensor([ids]))  # plain LM, before augmenting
    knn = Retriever(ds, KNNArgs(k=4, knn_temp=3.0)).log_probs(caps["ffn_input"][0], lm.vocab_size)  # [T, V]
    want = interpolate(torch.log_softmax(logits[0], -1), knn, 0.5)  # [T, V]
    with pytest.raises(KnnlmError, match="one λ"):
        augment_from_args(lm, AugmentArgs(datastore=str(ds.dir)), KNNArgs(lmbda=[0.1, 0.2]))
    augment_from_args(lm, AugmentArgs(datastore=str(ds.dir)), KNNArgs(k=4, lmbda=[0.5], knn_temp=3.0))
    srv, thread = start_server(lm, ServeArgs(port=0))
    try:
        status, r = _post(srv.url + "/completions", {"prompt": ids, "echo": True, "max_tokens": 3, "logprobs": 0,
                                                    "temperature": 0})
        assert status == 200
        lp = r["choices"][0]["logprobs"]["token_logprobs"]
        assert lp[1:len(ids)] == pytest.approx([float(want[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-5)
        assert lp[len(ids)] == pytest.approx(float(want[-1].max()), abs=1e-5)  # greedy from p_knnlm
        card = _get(srv.url + "/models")[1]["data"][0]["knnlm"]
        assert card["datastore_N"] == ds.N and card["k"] == 4 and card["lmbda"] == 0.5 and card["knn_temp"] == 3.0
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
        lm.model.knnlm.detach()


@pytest.mark.slow  # ~10-30 s: a fresh interpreter imports torch, transformers and every command group
def test_cli_serve_subprocess(tiny_gpt2_dir, tiny_lm):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "knnlm", "serve", "--model_name_or_path", str(tiny_gpt2_dir),
                             "--device", "cpu", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        status, r = _post(f"http://127.0.0.1:{port}/v1/completions",
                          {"prompt": "the cat", "echo": True, "max_tokens": 0, "logprobs": 1})
        ids = tiny_lm.encode("the cat")
        assert status == 200
        assert r["choices"][0]["logprobs"]["token_logprobs"][1] == pytest.approx(
            float(_log_softmax(tiny_lm, ids)[0, ids[1]]), abs=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)  # handled like Ctrl-C: shut down, exit 0
        assert proc.wait(timeout=30) == 0
        assert "stopping" in proc.stdout.read()


# ------------------------------------------------------------------------------------ serve: sampling, n, streaming
def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=60)


def _collect(stream) -> tuple[dict, list]:
    """Streamed completion chunks -> ({index: {"text", "tokens", "token_logprobs", "finish_reason"}}, usage chunks)."""
    out, usage = {}, []
    for chunk in stream:
        if not chunk.choices:
            usage.append(chunk.usage)
        for c in chunk.choices:
            acc = out.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "finish_reason": None})
            acc["text"] += c.text
            if c.logprobs is not None:
                acc["tokens"] += c.logprobs.tokens
                acc["token_logprobs"] += c.logprobs.token_logprobs
            assert acc["finish_reason"] is None  # nothing comes after a choice's finish reason
            acc["finish_reason"] = c.finish_reason
    return out, usage


@pytest.mark.parametrize("extra", [{}, {"echo": True, "logprobs": 2}, {"stop": "STOP"}])
def test_streamed_chunks_equal_the_non_streamed_greedy_text(server, tiny_lm, extra):
    """The openai client, greedy, 2 prompts x n = 2: the concatenated chunks of each choice are the whole answer."""
    client = _client(server.url)
    prompts = ["the cat sat on", "h\u00e9llo w\u00f6rld"]
    kw = {"model": tiny_lm.name, "prompt": prompts, "max_tokens": 12, "temperature": 0, "n": 2, **extra}
    if extra.get("stop"):  # a stop string the greedy text contains, in its middle
        text = client.completions.create(**{**kw, "stop": None}).choices[0].text
        kw["stop"] = text[len(text) // 3: len(text) // 3 + 4]
    whole = client.completions.create(**kw)
    streamed, usage = _collect(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert sorted(streamed) == [c.index for c in whole.choices] == [0, 1, 2, 3]
    for c in whole.choices:
        assert streamed[c.index]["text"] == c.text and streamed[c.index]["finish_reason"] == c.finish_reason
        if c.logprobs is not None:
            assert streamed[c.index]["tokens"] == c.logprobs.tokens
            assert streamed[c.index]["token_logprobs"] == c.logprobs.token_logprobs
    assert whole.choices[0].text == whole.choices[1].text  # greedy: n copies of one answer
    if extra.get("stop"):
        assert kw["stop"] not in whole.choices[0].text and whole.choices[0].finish_reason == "stop"
        assert text.startswith(whole.choices[0].text) and len(whole.choices[0].text) == text.find(kw["stop"])
    if extra.get("echo"):
        assert whole.choices[0].text.startswith(prompts[0]) and whole.choices[2].text.startswith(prompts[1])
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    assert usage[0].prompt_tokens == whole.usage.prompt_tokens == sum(len(tiny_lm.encode(p)) for p in prompts)


def test_stream_is_server_sent_events_ending_with_done(server):
    req = urllib.request.Request(server.url + "/completions", data=json.dumps(
        {"prompt": "the cat", "max_tokens": 3, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream" and r.headers["Transfer-Encoding"] == "chunked"
        events = r.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_client_leaving_mid_stream_does_not_stop_the_server(server):
    body = json.dumps({"prompt": "the cat", "max_tokens": 100, "temperature": 0, "stream": True}).encode()
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    assert _post(server.url + "/completions", {"prompt": "a", "max_tokens": 1})[0] == 200


def test_n_sampled_choices_are_seeded_and_scored_by_the_model(server, tiny_lm):
    """n = 3 samples at T = 1: reproducible with a seed, not all equal, and each token's log-prob is the model's own."""
    body = {"prompt": "the", "max_tokens": 6, "n": 3, "seed": 11, "logprobs": 0}
    status, r = _post(server.url + "/completions", body)
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert _post(server.url + "/completions", body)[1]["choices"] == r["choices"]
    texts = [c["text"] for c in r["choices"]]
    assert len(set(texts)) > 1, texts
    ids = tiny_lm.encode("the")
    for c in r["choices"]:
        seq = list(ids)
        for tok_text, lp in zip(c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"]):
            ref = _log_softmax(tiny_lm, seq)[-1]
            same = [t for t in torch.nonzero((ref - lp).abs() < 1e-5).flatten().tolist()]  # tokens of that log-prob
            seq.append(next((t for t in same if tiny_lm.tokenizer.decode([t]) == tok_text), same[0]))
        assert tiny_lm.tokenizer.decode(seq[len(ids):]) == c["text"]
    assert r["usage"]["completion_tokens"] == 18


def test_top_p_is_nucleus_sampling(server, tiny_lm):
    """top_p so small that only the most likely token is in the nucleus: sampling at T = 1 gives the greedy text."""
    greedy = _post(server.url + "/completions", {"prompt": "the cat", "max_tokens": 8, "temperature": 0})[1]
    for seed in (1, 2):
        nucleus = _post(server.url + "/completions", {"prompt": "the cat", "max_tokens": 8, "top_p": 1e-6,
                                                      "seed": seed})[1]
        assert nucleus["choices"][0]["text"] == greedy["choices"][0]["text"]
    full = [_post(server.url + "/completions", {"prompt": "the cat", "max_tokens": 8, "top_p": 1.0, "seed": s})[1]
            for s in (1, 2)]
    assert greedy["choices"][0]["text"] not in [f["choices"][0]["text"] for f in full]
    neutral = {"prompt": "a", "max_tokens": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
               "best_of": 1, "seed": (1 << 63) - 1}
    assert _post(server.url + "/completions", neutral)[0] == 200


def test_multibyte_characters_survive_echo_and_detokenization(server, tiny_lm):
    from knnlm.serve import Detokenizer

    prompt = "日本語 🙂 ok"
    status, r = _post(server.url + "/completions", {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 0})
    c = r["choices"][0]
    assert status == 200 and c["text"] == prompt and "".join(c["logprobs"]["tokens"]) == prompt
    assert len(c["logprobs"]["tokens"]) == len(tiny_lm.encode(prompt)) > len(prompt.split())  # bytes split across
    assert c["logprobs"]["text_offset"] == [sum(map(len, c["logprobs"]["tokens"][:i])) for i in range(len(
        c["logprobs"]["tokens"]))]
    decode = server.engine.decode
    ids = tiny_lm.encode("x 日本 " + prompt)  # generated tokens after a context: pushed one at a time
    cut = len(tiny_lm.encode("x 日"))
    d = Detokenizer(decode, ids[:cut])
    pieces = [d.push(t) for t in ids[cut:]]
    assert "".join(pieces) + d.flush() == decode(ids)[len(decode(ids[:cut])):] and "\ufffd" not in "".join(pieces)
    d = Detokenizer(decode, [])
    half = tiny_lm.encode("🙂")[:1]  # a sequence that ends inside a character: its bytes come out at the end
    assert d.push(half[0]) == "" and d.pending and d.flush() == decode(half)


# ------------------------------------------------------------------------------------------ serve: connections, stop
def _host_port(srv) -> tuple[str, int]:
    return srv.server_address[0], srv.server_address[1]


def _is_open(sock) -> bool:
    """Whether the server has left ``sock`` open (no FIN or reset waiting to be read)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def test_idle_connections_do_not_starve_workers(tiny_lm):
    """With 2 workers, 10 silent connections (never sending) and an idle keep-alive: a request is answered while
    they all stay open (before: it waited for them to time out)."""
    import http.client

    srv, thread = start_server(tiny_lm, ServeArgs(port=0, workers=2, max_queue=0, request_timeout_s=120))
    try:
        silent = [socket.create_connection(_host_port(srv), timeout=30) for _ in range(10)]
        keep = http.client.HTTPConnection(*_host_port(srv), timeout=30)
        keep.request("GET", "/health")
        assert keep.getresponse().read() == b'{"status": "ok"}'
        status, r = _post(srv.url + "/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 200 and srv.rejected == 0
        assert all(_is_open(s) for s in silent) and _is_open(keep.sock)
        keep.request("GET", "/health")  # the kept-alive connection still serves
        assert keep.getresponse().status == 200
        for s in silent:
            s.close()
    finally:
        srv.stop()
        srv.server_close()
        thread.join(timeout=10)


def _partial_request(srv, body: bytes, sent: int):
    """A connection that has sent headers and the first ``sent`` bytes of ``body``: a request in flight."""
    s = socket.create_connection(_host_port(srv), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:sent]))
    return s


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):  # reset: a probe caught in the backlog as the socket closed
        return True


def _read_response(sock) -> tuple[str, dict]:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), json.loads(body)


def test_graceful_stop_answers_in_flight_and_closes_idle_connections(tiny_lm):
    """stop(): new connections refused at once, an idle keep-alive closed, a request in flight (its body still
    arriving) answered with Connection: close, then stop returns with nothing cut."""
    import http.client

    srv, thread = start_server(tiny_lm, ServeArgs(port=0, request_timeout_s=120, shutdown_grace_s=60))
    host, port = _host_port(srv)
    keep = http.client.HTTPConnection(host, port, timeout=30)
    keep.request("GET", "/health")
    keep.getresponse().read()
    body = json.dumps({"prompt": "the cat", "max_tokens": 2, "temperature": 0}).encode()
    inflight = _partial_request(srv, body, 5)
    for _ in range(200):  # the server has handed the request to a worker
        if srv._active:
            break
        time.sleep(0.01)
    assert srv._active, "the partial request was not handed to a worker within 2 s"
    result = []
    stopper = threading.Thread(target=lambda: result.append(srv.stop()))
    stopper.start()
    for _ in range(500):
        if _refused(host, port):
            break
        time.sleep(0.01)
    assert _refused(host, port)
    assert keep.sock.recv(1) == b""  # the idle keep-alive was closed
    assert stopper.is_alive()  # still waiting for the request in flight
    inflight.sendall(body[5:])
    head, r = _read_response(inflight)
    stopper.join(timeout=30)
    assert head.startswith("HTTP/1.1 200") and "Connection: close" in head
    assert r["choices"][0]["text"] == _post_direct(tiny_lm, "the cat", 2)
    assert result == [0] and not stopper.is_alive()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _post_direct(lm, prompt: str, n: int) -> str:
    """The greedy continuation recomputed without a KV cache."""
    seq = lm.encode(prompt)
    start = len(seq)
    for _ in range(n):
        seq.append(int(torch.argmax(_log_softmax(lm, seq)[-1])))
    return lm.tokenizer.decode(seq[start:])


def test_graceful_stop_cuts_what_outlives_the_grace_period(tiny_lm):
    srv, thread = start_server(tiny_lm, ServeArgs(port=0, request_timeout_s=120, shutdown_grace_s=0.2))
    stalled = _partial_request(srv, b'{"prompt": "a", "max_tokens": 1}', 3)  # never completed
    for _ in range(200):
        if srv._active:
            break
        time.sleep(0.01)
    assert srv._active, "the partial request was not handed to a worker within 2 s"
    assert srv.stop() == 1
    assert stalled.recv(1) == b""
    srv.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serve_stops_on_signal_with_an_idle_openai_connection(tiny_gpt2_dir, tiny_lm, sig):
    """The real CLI: the openai client's idle keep-alive connection open, a request in flight, then SIGTERM/SIGINT:
    new connections refused, the request answered, exit 0 within --shutdown_grace_s (before: still running 30 s
    after `kill`, until the idle connection timed out)."""
    port, grace = _free_port(), 20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "knnlm", "serve", "--model_name_or_path", str(tiny_gpt2_dir),
                             "--device", "cpu", "--port", str(port), "--request_timeout_s", "120",
                             "--shutdown_grace_s", str(grace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        client = _client(f"http://127.0.0.1:{port}/v1")
        assert client.completions.create(model=str(tiny_gpt2_dir), prompt="the cat", max_tokens=2).choices
        body = json.dumps({"prompt": "the cat", "max_tokens": 2, "temperature": 0}).encode()
        inflight = socket.create_connection(("127.0.0.1", port), timeout=30)
        inflight.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # answered: the connection is accepted
        got = b""
        while not got.endswith(b'{"status": "ok"}'):
            chunk = inflight.recv(65536)
            assert chunk, got
            got += chunk
        inflight.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body[:5]))
        proc.send_signal(sig)
        for _ in range(1000):
            if _refused("127.0.0.1", port):
                break
            time.sleep(0.01)
        assert _refused("127.0.0.1", port)
        inflight.sendall(body[5:])
        head, r = _read_response(inflight)
        assert head.startswith("HTTP/1.1 200") and r["choices"][0]["text"] == _post_direct(tiny_lm, "the cat", 2)
        assert proc.wait(timeout=grace) == 0
        out = proc.stdout.read()
        assert "stopping" in out and "stopped\n" in out
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------------------ scorer
def _direct_ll(lm, prefix: str, target: str) -> float:
    """log p(target | prefix) from the model's own log-softmax over prefix + target."""
    n_prefix = len(lm.encode(prefix))
    ids = lm.encode(prefix + target)
    ref = _log_softmax(lm, ids)
    return float(sum(ref[t - 1, ids[t]] for t in range(n_prefix, len(ids))))


def _cli_api(argv: list[str]) -> int:
    """``knnlm overspec api ARGV...`` through the real command line."""
    from knnlm.cli import main

    return main(["overspec", *argv])


def test_api_scorer_matches_direct_computation(server, tiny_lm, village, tmp_path, monkeypatch):
    from knnlm.macondo.generate import read_split
    from knnlm.macondo.score import score_split

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-not-written")
    out = tmp_path / "out"
    argv = ["api", "--base_url", server.url, "--model", tiny_lm.name, "--data", str(village), "--seeds", "5",
            "--output_dir", str(out), "--batch_size", "3"]
    assert _cli_api(argv) == 0
    res = json.loads((out / "results.json").read_text())
    run = res["metrics"]["runs"][0]
    assert run["model"] == tiny_lm.name and run["village_seed"] == 3 and run["seed"] == 5
    for split in ("test", "test_overspecified"):
        rows = read_split(village, split)
        examples = json.loads((out / "seed-5" / f"scores_{split}.json").read_text())["examples"]
        assert len(examples) == len(rows) == 8  # 4 parents x 2 children
        direct = [_direct_ll(tiny_lm, r["prefix"], r["target"]) for r in rows]
        assert [e["ll"] for e in examples] == pytest.approx(direct, abs=1e-4)
        assert [e["ll"] for e in examples] == pytest.approx(score_split(tiny_lm, rows)["lm"], abs=1e-4)
        assert all(e["n_tokens"] == 1 and not e["straddle"] for e in examples)
        summary = run["splits"][split]["summary"]
        assert summary["2"] == pytest.approx(sum(direct) / 8, abs=1e-4)
        assert summary["optimum"]["2"] == pytest.approx(math.log(0.5))
        over = res["metrics"]["over_seeds"][split]  # one seed: the mean is its value, the std null (docs/studies.md)
        assert over["mean"]["2"] == summary["2"] and set(over["std"].values()) == {None}
    table = (out / "results.md").read_text()
    assert f"| 2 | 8 | {run['splits']['test']['summary']['2']:.2f} |" in table and "-0.69" in table
    assert "sk-secret" not in (out / "config.json").read_text() + (out / "results.json").read_text()
    # a rerun reads the cached scores: it needs no endpoint at all
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    argv[argv.index(server.url)] = dead
    assert _cli_api(argv) == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["runs"][0]["splits"] == run["splits"]


def test_target_log_likelihood_straddle():
    lp = argparse.Namespace(tokens=["ab", "c:", " X", "y"], token_logprobs=[None, -1.0, -2.0, -0.5],
                            text_offset=[0, 2, 4, 6])
    assert OC.target_log_likelihood(lp, 4, 7) == (-2.5, 2, False)  # " Xy" of "abc: Xy"
    assert OC.target_log_likelihood(lp, 3, 7) == (-3.5, 3, True)  # ": Xy": "c:" starts before the target
    assert OC.target_log_likelihood(lp, 4, 6) == (-2.0, 1, False)  # " X": a token after the span is left out
    with pytest.raises(ValueError, match="first token has no log-probability"):
        OC.target_log_likelihood(lp, 0, 2)  # the first token has no log-probability
    # a character split over tokens: serve gives the tokens before the last "" at the character's offset; before,
    # those at the target's start were left out (" 日本語" scored over 5 of its 7 tokens)
    lp = argparse.Namespace(tokens=["ab", "", "", " \u65e5", "x"], token_logprobs=[None, -1.0, -2.0, -4.0, -8.0],
                            text_offset=[0, 2, 2, 2, 4])
    assert OC.target_log_likelihood(lp, 2, 4) == (-7.0, 3, False)
    assert OC.target_log_likelihood(lp, 2, 5) == (-15.0, 4, False)


def test_unreachable_endpoint_one_line_error(village, tmp_path):
    args = A.ApiArgs(base_url=f"http://127.0.0.1:{_free_port()}/v1", model=["m"], data=str(village),
                     output_dir=str(tmp_path))
    args.validate()
    with pytest.raises(KnnlmError, match=r"^--base_url: cannot reach http://127\.0\.0\.1") as e:
        A.run_api(args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"model": []}, "--model: give one fine-tuned model per seed"),
    ({"model": ["a"], "seeds": [0, 1]}, "--model: give one fine-tuned model per seed"),
    ({"model": ["a", "b"], "submit": True}, "--model: with --submit"),
    ({"model": ["a"], "data": "d", "seeds": [0, 1], "submit": True}, "--data: names one village"),
    ({"model": ["a"], "splits": ["dev"]}, "--splits: dev"),
    ({"model": ["a"], "splits": [""]}, "--splits: none given"),
    ({"model": ["a"], "poll_s": 0}, "--poll_s"),
    ({"model": ["a"], "base_url": "127.0.0.1:8000"}, "--base_url"),
    ({"model": ["a"], "output_dir": None}, "--output_dir"),
    ({"model": [""]}, "--model: an empty model name"),  # was sent to the server after the village was made
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(KnnlmError, match=f"^{needle}"):
        A.ApiArgs(**{"output_dir": "o", **kwargs}).validate()


# ------------------------------------------------------------------------------------------------------------ fine-tuning
class _StubApi(ThreadingHTTPServer):
    """A test double of the remote API: /v1/files, /v1/fine_tuning/jobs (status advancing one step per retrieve) and
    /v1/completions through a CompletionEngine (``logprobs=False`` drops the log-probs, as a chat-only API would;
    ``min_tokens=1`` refuses max_tokens=0, as recent vLLM does; ``refuse_echo`` answers as OpenAI's hosted models;
    ``refuse_all`` refuses every completion with that message)."""

    daemon_threads = True

    def __init__(self, engine=None, statuses=("validating_files", "running", "running", "succeeded"), logprobs=True,
                 min_tokens=0, refuse_echo=False, refuse_all=""):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.engine, self.statuses, self.logprobs, self.min_tokens = engine, list(statuses), logprobs, min_tokens
        self.refuse_echo, self.refuse_all = refuse_echo, refuse_all
        self.max_tokens_seen = []
        self.files, self.jobs, self.creates, self.retrieves = {}, {}, [], 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _job_view(self, job: dict) -> dict:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    def do_POST(self):
        s, raw = self.server, self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with s.lock:
            if self.path == "/v1/files":
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
                content = parts["file"].get_payload(decode=True)
                fid = f"file-{len(s.files)}"
                s.files[fid] = {"content": content, "purpose": parts["purpose"].get_content().strip(),
                                "filename": parts["file"].get_filename()}
                self._send(200, {"id": fid, "object": "file", "bytes": len(content), "created_at": 0,
                                 "filename": s.files[fid]["filename"], "purpose": "fine-tune", "status": "processed"})
            elif self.path == "/v1/fine_tuning/jobs":
                body = json.loads(raw)
                s.creates.append(body)
                jid = f"ftjob-{len(s.jobs)}"
                s.files[f"file-metrics-{jid}"] = {"content": b"step,train_loss,valid_loss\n1,2.5,2.7\n"}
                s.jobs[jid] = {"id": jid, "object": "fine_tuning.job", "created_at": 0, "model": body["model"],
                               "status": "validating_files", "fine_tuned_model": None, "result_files": [],
                               "training_file": body["training_file"], "trained_tokens": None, "error": None,
                               "_step": 0}
                self._send(200, self._job_view(s.jobs[jid]))
            elif self.path == "/v1/completions" and s.engine is not None:
                body = json.loads(raw)
                s.max_tokens_seen.append(body["max_tokens"])
                if s.refuse_all:
                    self._send(400, {"error": {"message": s.refuse_all, "type": "BadRequestError"}})
                    return
                if s.refuse_echo and body.get("echo"):
                    self._send(400, {"error": {"message": "Setting 'echo' and 'logprobs' at the same time is not "
                                                          "supported for this model.", "type": "invalid_request_error"}})
                    return
                if body["max_tokens"] < s.min_tokens:
                    self._send(400, {"error": {"message": f"max_tokens must be at least {s.min_tokens}, got "
                                                          f"{body['max_tokens']}.", "type": "BadRequestError"}})
                    return
                resp = s.engine.complete(body)
                if not s.logprobs:
                    for c in resp["choices"]:
                        c["logprobs"] = None
                self._send(200, resp)
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_GET(self):
        s = self.server
        with s.lock:
            parts = self.path.split("?")[0].strip("/").split("/")  # v1 fine_tuning jobs <id> [events]
            if parts[1:3] == ["fine_tuning", "jobs"] and parts[3] in s.jobs:
                job = s.jobs[parts[3]]
                if len(parts) == 5:
                    events = [{"id": f"ev-{i}", "object": "fine_tuning.job.event", "created_at": i, "level": "info",
                               "message": f"status {st}"} for i, st in enumerate(s.statuses[:job["_step"]])]
                    self._send(200, {"object": "list", "data": events[::-1], "has_more": False})
                    return
                s.retrieves += 1
                job["status"] = s.statuses[min(job["_step"], len(s.statuses) - 1)]
                job["_step"] += 1
                if job["status"] == "succeeded":
                    job["fine_tuned_model"] = s.engine.name if s.engine else f"ft:{job['model']}:{job['id']}"
                    job["result_files"] = [f"file-metrics-{job['id']}"]
                    job["trained_tokens"] = 1234
                elif job["status"] == "failed":
                    job["error"] = {"message": "training file has too few examples", "code": "invalid", "param": None}
                self._send(200, self._job_view(job))
            elif parts[1] == "files" and len(parts) == 4 and parts[3] == "content" and parts[2] in s.files:
                data = s.files[parts[2]]["content"]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})


@pytest.fixture
def stub_api():
    servers = []

    def make(**kw):
        srv = _StubApi(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _submit_args(url: str, village: Path, out: Path, **kw) -> A.ApiArgs:
    args = A.ApiArgs(base_url=url, model=["base-model"], data=str(village), seeds=[2], submit=True, n_epochs=3,
                     poll_s=0.001, output_dir=str(out), **kw)
    args.validate()
    return args


def test_submit_uploads_polls_and_resumes(stub_api, village, tmp_path):
    api = stub_api()
    args = _submit_args(api.url, village, tmp_path)
    client = OC.make_client(api.url, "EMPTY")
    sleeps = []
    state = A.finetune(client, args, village, tmp_path, 2, sleep=sleeps.append)
    assert state["fine_tuned_model"] == "ft:base-model:ftjob-0" and state["status"] == "succeeded"
    assert len(sleeps) == 3 and api.retrieves == 4  # validating, running, running, succeeded
    assert api.files["file-0"]["content"] == (village / "train_chat.jsonl").read_bytes()
    assert api.files["file-0"]["purpose"] == "fine-tune"
    assert api.files["file-1"]["content"] == (village / "test_chat.jsonl").read_bytes()
    (create,) = api.creates
    assert create["model"] == "base-model" and create["training_file"] == "file-0"
    assert create["validation_file"] == "file-1" and create["seed"] == 2
    assert create["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3
    assert (tmp_path / "metrics.csv").read_text().startswith("step,train_loss,valid_loss")
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] == "ftjob-0"
    # a rerun with the same settings uploads nothing and starts no job
    again = A.finetune(client, args, village, tmp_path, 2, sleep=sleeps.append)
    assert again["fine_tuned_model"] == state["fine_tuned_model"]
    assert len(api.files) == 3 and len(api.creates) == 1 and api.retrieves == 4  # a finished job is not asked again


def test_submit_killed_while_waiting_resumes_same_job(stub_api, village, tmp_path):
    api = stub_api()
    args = _submit_args(api.url, village, tmp_path, validation_split="")
    client = OC.make_client(api.url, "EMPTY")

    def killed(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.finetune(client, args, village, tmp_path, 2, sleep=killed)
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] == "ftjob-0"
    state = A.finetune(client, args, village, tmp_path, 2, sleep=lambda _: None)
    assert state["fine_tuned_model"] == "ft:base-model:ftjob-0"
    assert len(api.creates) == 1 and len(api.files) == 2  # training file + the job's metrics; no validation file
    assert "validation_file" not in api.creates[0]


def test_failed_job_is_reported_and_replaced_on_rerun(stub_api, village, tmp_path):
    api = stub_api(statuses=("running", "failed"))
    args = _submit_args(api.url, village, tmp_path)
    client = OC.make_client(api.url, "EMPTY")
    with pytest.raises(KnnlmError, match=r"^--submit: fine-tuning job ftjob-0 \(seed 2\) ended failed \(training file "
                                         r"has too few examples\)"):
        A.finetune(client, args, village, tmp_path, 2, sleep=lambda _: None)
    api.statuses = ["succeeded"]
    state = A.finetune(client, args, village, tmp_path, 2, sleep=lambda _: None)
    assert state["job_id"] == "ftjob-1" and len(api.creates) == 2
    assert api.creates[1]["training_file"] == "file-0"  # the uploaded file is reused


def test_submit_end_to_end_scores_the_fine_tuned_model(stub_api, tiny_lm, village, tmp_path):
    engine = CompletionEngine(tiny_lm, name="ft:base-model:knnlm::abc")
    api = stub_api(engine=engine, statuses=("running", "succeeded"))
    out = tmp_path / "out"
    argv = ["api", "--base_url", api.url, "--model", "base-model", "--data", str(village), "--seeds", "2",
            "--submit", "true", "--poll_s", "0.001", "--splits", "test", "--output_dir", str(out)]
    assert _cli_api(argv) == 0
    run = json.loads((out / "results.json").read_text())["metrics"]["runs"][0]
    assert run["model"] == "ft:base-model:knnlm::abc" and run["job"]["job_id"] == "ftjob-0"
    from knnlm.macondo.generate import read_split

    rows = read_split(village, "test")
    direct = [_direct_ll(tiny_lm, r["prefix"], r["target"]) for r in rows]
    assert run["splits"]["test"]["summary"]["avg"] == pytest.approx(sum(direct) / len(direct), abs=1e-4)
    # trained on chat messages, scored as plain text: the table and results.json say so
    assert json.loads((out / "results.json").read_text())["metrics"]["format_note"] == A.FORMAT_NOTE
    assert f"Note: {A.FORMAT_NOTE}." in (out / "results.md").read_text()


def test_endpoint_without_logprobs_one_line_error(stub_api, tiny_lm, village, tmp_path):
    api = stub_api(engine=CompletionEngine(tiny_lm, name="m"), logprobs=False)
    args = A.ApiArgs(base_url=api.url, model=["m"], data=str(village), output_dir=str(tmp_path))
    args.validate()
    with pytest.raises(KnnlmError, match=r"^--base_url: http://127\.0\.0\.1:\d+/v1 returned no log-probabilities"):
        A.run_api(args)


def test_server_refusing_zero_max_tokens_gets_one_token_ignored(stub_api, tiny_lm, village, tmp_path):
    from knnlm.macondo.generate import read_split

    api = stub_api(engine=CompletionEngine(tiny_lm, name="m"), min_tokens=1)
    rows = read_split(village, "test")
    scores = OC.score_rows(OC.make_client(api.url, "EMPTY"), api.url, "m", rows, batch_size=3)
    assert api.max_tokens_seen == [0, 1, 1, 1]  # refused once, then 1 token for each of the 3 batches
    direct = [_direct_ll(tiny_lm, r["prefix"], r["target"]) for r in rows]
    assert [s["ll"] for s in scores] == pytest.approx(direct, abs=1e-4)
    assert all(s["n_tokens"] == 1 for s in scores)


def test_endpoint_refusing_echo_names_the_fix(stub_api, tiny_lm, village, tmp_path):
    api = stub_api(engine=CompletionEngine(tiny_lm, name="m"), refuse_echo=True)
    args = A.ApiArgs(base_url=api.url, model=["m"], data=str(village), output_dir=str(tmp_path))
    args.validate()
    with pytest.raises(KnnlmError, match=r"^--base_url: .* refused scoring with m \(HTTP 400: Setting 'echo' and "
                                         r"'logprobs'.*--submit --splits ''") as e:
        A.run_api(args)
    assert "\n" not in str(e.value)


def test_request_refused_for_another_reason_is_named_as_the_server_put_it(stub_api, tiny_lm, village, caplog):
    """Any 400 on the first echo request was read as "max_tokens=0 refused": a warning saying so, and the error of the
    1-token retry carried the echo hint, about a prompt too long for the model."""
    from knnlm.macondo.generate import read_split

    msg = "This model's maximum context length is 8 tokens. However, you requested 12 tokens."
    api = stub_api(engine=CompletionEngine(tiny_lm, name="m"), refuse_all=msg)
    with pytest.raises(KnnlmError, match=r"^--base_url: .* refused scoring with m \(HTTP 400: This model's maximum "
                                         r"context length is 8 tokens\. However, you requested 12 tokens\.\)$"):
        OC.score_rows(OC.make_client(api.url, "EMPTY"), api.url, "m", read_split(village, "test"), batch_size=3)
    assert api.max_tokens_seen == [0, 1]  # 1 token asked for once, in case it was max_tokens=0
    assert "refused max_tokens=0" not in caplog.text


def test_submit_fine_tune_only(stub_api, village, tmp_path):
    api = stub_api(statuses=("running", "succeeded"))
    out = tmp_path / "out"
    argv = ["api", "--base_url", api.url, "--model", "base-model", "--data", str(village), "--seeds", "2",
            "--submit", "true", "--poll_s", "0.001", "--splits", "", "--output_dir", str(out)]
    assert _cli_api(argv) == 0
    run = json.loads((out / "results.json").read_text())["metrics"]["runs"][0]
    assert run["splits"] == {} and run["model"] == "ft:base-model:ftjob-0"
    assert run["job"]["final_metrics"] == {"step": 1.0, "train_loss": 2.5, "valid_loss": 2.7}
    assert "| 2 | ftjob-0 | ft:base-model:ftjob-0 | 1234 | 2.5000 | 2.7000 |" in (out / "results.md").read_text()


def test_api_output_and_data_folders_are_checked_before_any_work(village, tmp_path):
    """Before: a village was written into a datastore or model folder given as --output_dir, a file as --output_dir
    gave 'File exists' naming no flag, and a datastore as --data was called "a 'knnlm-datastore/1' Macondo village"
    (leaving an empty seed folder)."""
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "a.txt").write_text("x")
    for out, needle in ((theirs, "--output_dir"), (tmp_path / "a.txt", "--output_dir")):
        with pytest.raises(KnnlmError, match=f"^{needle}"):
            A.run_api(A.ApiArgs(base_url=dead, model=["m"], output_dir=str(out)))
    assert sorted(p.name for p in theirs.iterdir()) == ["model.safetensors"]
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text(json.dumps({"format": "knnlm-datastore/1", "N": 3}))
    out = tmp_path / "o"
    with pytest.raises(KnnlmError, match=r"^--data: .*store is not a Macondo village"):
        A.run_api(A.ApiArgs(base_url=dead, model=["m"], data=str(store), output_dir=str(out)))
    assert not list(out.glob("seed-*"))


def test_a_base_url_that_is_not_the_api_root_names_base_url(server, village, tmp_path):
    """Before: a --base_url without /v1 (or with /v2) was blamed on --model ("has no model")."""
    root = server.url.rsplit("/v1", 1)[0]
    for i, url in enumerate((root, root + "/v2")):
        args = A.ApiArgs(base_url=url, model=[server.engine.name], data=str(village), output_dir=str(tmp_path / str(i)))
        with pytest.raises(KnnlmError, match=r"^--base_url: .* has no endpoint for .*pass the API's root"):
            A.run_api(args)
    args = A.ApiArgs(base_url=server.url, model=["nope"], data=str(village), output_dir=str(tmp_path / "m"))
    with pytest.raises(KnnlmError, match=r"^--model: .* has no nope \(The model `nope` does not exist"):
        A.run_api(args)


def test_a_village_of_another_tokenizer_is_refused(village, tmp_path, monkeypatch):
    """Before: an existing village (--data, or a rerun's own) was used whatever --tokenizer said, exit 0; and a run
    against api.openai.com with no key made its village before the upload failed on the key."""
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(KnnlmError, match=r"^--tokenizer: the village in .* was made with 'gpt2', not 'gpt2-xl'; "
                                         r"drop --tokenizer"):
        A.run_api(A.ApiArgs(base_url=dead, model=["m"], data=str(village), tokenizer="gpt2-xl",
                            output_dir=str(tmp_path / "d")))
    out = tmp_path / "own"
    with pytest.raises(KnnlmError, match=r"^--base_url: cannot reach"):  # the village is made, then no server
        A.run_api(A.ApiArgs(base_url=dead, model=["m"], tokenizer="gpt2", output_dir=str(out)))
    with pytest.raises(KnnlmError, match=r"^--tokenizer: the village in .*seed-0/data was made with 'gpt2', not "
                                         r"'tiktoken:cl100k_base'; pass --tokenizer gpt2 to resume"):
        A.run_api(A.ApiArgs(base_url=dead, model=["m"], output_dir=str(out)))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(KnnlmError, match=r"^--api_key: https://api.openai.com/v1 needs a key"):
        A.run_api(A.ApiArgs(base_url="https://api.openai.com/v1", model=["m"], submit=True,
                            output_dir=str(tmp_path / "openai")))
    assert not (tmp_path / "openai").exists()


def test_api_village_with_the_parent_holdout(stub_api, tiny_lm, village, tmp_path):
    """`overspec api` generated its villages with the pair holdout only (most control prefixes seen in training with
    a sibling's name); --control_holdout parent makes them as `knnlm macondo generate` does, and a village of the
    other holdout is refused as one of another tokenizer is."""
    from knnlm.macondo.generate import MacondoArgs, generate_macondo, read_split

    api = stub_api(engine=CompletionEngine(tiny_lm, name="m"))
    out = tmp_path / "own"
    args = A.ApiArgs(base_url=api.url, model=["m"], tokenizer="gpt2", control_holdout="parent", output_dir=str(out))
    args.validate()
    run = A.run_api(args)["runs"][0]
    assert run["village_control_holdout"] == "parent"
    data = out / "seed-0" / "data"
    want = tmp_path / "want"  # the same village made by the generator itself
    generate_macondo(MacondoArgs(output_dir=str(want), seed=0, tokenizer="gpt2", format="conv",
                                 control_holdout="parent"))
    assert read_split(data, "test_overspecified") == read_split(want, "test_overspecified")
    train_prefixes = {r["prefix"] for r in read_split(data, "train")}
    assert not any(r["prefix"] in train_prefixes for r in read_split(data, "test_overspecified"))
    with pytest.raises(KnnlmError, match=r"^--control_holdout: the village in .*seed-0/data was made with 'parent', "
                                         r"not 'pair'; pass --control_holdout parent to resume"):
        A.run_api(A.ApiArgs(base_url=api.url, model=["m"], tokenizer="gpt2", output_dir=str(out)))
    with pytest.raises(KnnlmError, match=r"^--control_holdout: the village in .* was made with 'pair', not 'parent'; "
                                         r"drop --control_holdout"):
        A.run_api(A.ApiArgs(base_url=api.url, model=["m"], data=str(village), control_holdout="parent",
                            output_dir=str(tmp_path / "d")))
    assert A.run_api(A.ApiArgs(base_url=api.url, model=["m"], data=str(village), splits=["test"],
                               output_dir=str(tmp_path / "d")))["runs"][0]["village_control_holdout"] == "pair"


def test_streamed_tokens_equal_the_whole_answers_around_stops_and_split_characters(tiny_lm):
    """Brute force over seeded texts of multi-token characters, stop strings drawn from the text, echo or not: the
    streamed chunks' tokens are the whole answer's, and the text is the generated text cut at the first stop. Before:
    a text-less piece (bytes of a character that opens a stop string) was streamed and then cut from the whole answer
    (42 of 600 cases), and a stop at the first character kept one clipped token where any other cut keeps none."""
    import random

    from knnlm.serve import Choice, CompletionEngine, Request

    engine = CompletionEngine(tiny_lm, name="m")
    logp = torch.log_softmax(torch.randn(tiny_lm.vocab_size, generator=torch.Generator().manual_seed(0)), -1)
    rng = random.Random(2)
    alphabet = list("ab .") + list("\u00e9\u65e5\u672c\U0001F600")
    for _ in range(300):
        gen = tiny_lm.encode("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        gen = gen[: rng.randint(1, len(gen))] if rng.random() < 0.5 else gen  # sometimes ending inside a character
        prompt = tiny_lm.encode(rng.choice(["x", "\u65e5", "a b"]))
        full = engine.decode(prompt + gen)[len(engine.decode(prompt)):]
        stops = []
        if rng.random() < 0.7 and full:
            i = rng.randrange(len(full))
            stops.append(full[i: i + rng.randint(1, 3)])
        stops = [x for x in stops if x and "\ufffd" not in x]
        echo = rng.random() < 0.3
        choice = Choice(engine, 0, prompt, Request(prompts=[prompt], max_tokens=len(gen), logprobs=1, echo=echo,
                                                   stop=stops))
        chunks = []
        if echo:
            choice.echo(prompt, torch.stack([logp] * len(prompt)))
            chunks.append(choice.chunk())
        for t in gen:
            if choice.finished:
                break
            choice.add(t, logp)
            chunks.append(choice.chunk())
        choice.finish()
        chunks.append(choice.chunk())
        chunks = [c for c in chunks if c]
        whole = choice.result()
        cuts = [full.find(x) for x in stops if full.find(x) >= 0]
        want = (engine.decode(prompt) if echo else "") + (full[: min(cuts)] if cuts else full)
        case = (gen, stops, echo)
        assert whole["text"] == want and "".join(whole["logprobs"]["tokens"]) == want, case
        assert sum((c["logprobs"]["tokens"] for c in chunks), []) == whole["logprobs"]["tokens"], case
        assert sum((c["logprobs"]["token_logprobs"] for c in chunks), []) == whole["logprobs"]["token_logprobs"], case
        assert [c["finish_reason"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True], case
        if cuts and min(cuts) == 0 and not echo:
            assert whole["logprobs"]["tokens"] == [], case
