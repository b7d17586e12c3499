"""Calling an OpenAI-compatible API (OpenAI, vLLM, SGLang, `knnlm serve`): the client with its failures as one-line
``KnnlmError``s naming the flag to fix, fine-tuning jobs (upload, poll, result files), and the log-likelihood of a
span of a prompt from the log-probs the server echoes (``/v1/completions`` with ``echo=True, max_tokens=0``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from .errors import KnnlmError
from .fileio import atomic_write_json, atomic_write_text, reusable, sha256_file

log = logging.getLogger(__name__)

JOB_DONE = ("succeeded", "failed", "cancelled")
ECHO_HINT = ("scoring needs a /v1/completions endpoint that returns prompt log-probs with echo=true (vLLM, SGLang, "
             "`knnlm serve`); for an API without them, fine-tune only with --submit --splits ''")


def make_client(base_url: str, api_key: str, timeout: float = 600.0, max_retries: int = 2):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)


def api_call(fn: Callable, base_url: str, what: str, model: str | None = None, passthrough: tuple = ()):
    """Runs one API call, turning the client's exceptions (except ``passthrough``) into one-line KnnlmErrors that name
    the flag to fix."""
    import openai

    try:
        return fn()
    except passthrough:
        raise
    except openai.APIConnectionError as e:  # includes timeouts
        raise KnnlmError(f"--base_url: cannot reach {base_url} ({type(e).__name__}: {e}) while {what}; start the server "
                         "(e.g. `knnlm serve --model_name_or_path M`) or fix the URL") from None
    except openai.AuthenticationError:
        raise KnnlmError(f"--api_key: {base_url} rejected the key while {what}; set --api_key or $OPENAI_API_KEY") from None
    except openai.NotFoundError as e:
        msg = _message(e)
        if model and "model" in msg.lower():  # the servers' "model ... does not exist"; anything else is the URL's
            raise KnnlmError(f"--model: {base_url} has no {model} ({msg}) while {what}; list the served models with "
                             f"GET {base_url.rstrip('/')}/models") from None
        raise KnnlmError(f"--base_url: {base_url} has no endpoint for {what} ({msg}); pass the API's root (e.g. "
                         "http://127.0.0.1:8000/v1), and with --submit a provider that has a fine-tuning API") from None
    except openai.APIStatusError as e:
        raise KnnlmError(f"--base_url: {base_url} refused {what} (HTTP {e.status_code}: {_message(e)})") from None


def _message(e) -> str:
    """The server's error message (OpenAI-style ``{"error": {"message": ...}}`` or the client's text), one line."""
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    msg = body.get("message") if isinstance(body, dict) else None
    return str(msg or e).splitlines()[0][:200]


def upload(client, base_url: str, path: Path) -> str:
    with open(path, "rb") as fh:
        f = api_call(lambda: client.files.create(file=(path.name, fh), purpose="fine-tune"), base_url,
                      f"uploading {path}")
    log.info("uploaded %s as %s", path, f.id)
    return f.id


def wait_for_job(client, base_url: str, job_id: str, poll_s: float, label: str = "",
                 sleep: Callable[[float], None] = time.sleep):
    """Polls a fine-tuning job until it succeeds, fails or is cancelled; logs status changes and new job events."""
    seen, status, started = set(), None, time.time()
    while True:
        job = api_call(lambda: client.fine_tuning.jobs.retrieve(job_id), base_url, f"checking job {job_id}")
        if job.status != status:
            status = job.status
            log.info("%sjob %s: %s (%.0fs)", label, job_id, status, time.time() - started)
        events = api_call(lambda: client.fine_tuning.jobs.list_events(job_id, limit=20), base_url,
                           f"reading the events of job {job_id}")
        for ev in reversed(list(events.data)):  # the API lists newest first
            if ev.id not in seen:
                seen.add(ev.id)
                log.info("%sjob %s: %s", label, job_id, ev.message)
        if status in JOB_DONE:
            return job
        sleep(poll_s)


def job_metrics(client, base_url: str, state: dict, run_dir: Path) -> dict:
    """Downloads the job's result files once (``metrics.csv``: step, train/valid loss) and notes their last values."""
    for i, fid in enumerate(state["result_files"]):  # the job's metrics (step, train/valid loss) as CSV
        target = run_dir / ("metrics.csv" if i == 0 else f"metrics_{i}.csv")
        if not target.is_file():
            content = api_call(lambda: client.files.content(fid), base_url, f"downloading result file {fid}")
            atomic_write_text(target, content.text)
    if (run_dir / "metrics.csv").is_file():
        state["final_metrics"] = last_metrics(run_dir / "metrics.csv")
    return state


def last_metrics(path: Path) -> dict:
    """The last value of every numeric column of a job's metrics CSV (step, train_loss, valid_loss, ...)."""
    import csv

    last: dict = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                try:
                    last[key] = float(value)
                except (TypeError, ValueError):
                    continue
    return last


def target_log_likelihood(logprobs, start: int, end: int) -> tuple[float, int, bool]:
    """(sum of the log-probs of the echoed tokens that overlap the characters [start, end), their count, whether one of
    them begins before ``start``, i.e. straddles the prefix/target boundary).

    ``logprobs``: a completion choice's ``logprobs`` (``tokens``, ``token_logprobs``, ``text_offset``).
    """
    total, n, straddle = 0.0, 0, False
    for tok, lp, off in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset):
        # a token of no text (bytes of a character that a later token completes: serve gives them "") at ``start``
        # is the target's first character's
        if off >= end or (off + len(tok) <= start and not (tok == "" and off == start)):
            continue
        if off < start:
            straddle = True
        if lp is None:
            raise ValueError("the target's first token has no log-probability (nothing precedes it)")
        total += float(lp)
        n += 1
    return total, n, straddle


def _echo_completions(client, base_url: str, model: str, prompts: list[str], state: dict):
    """One echo request; a server that refuses ``max_tokens=0`` (recent vLLM) is asked for one token instead, which
    the span arithmetic then ignores. ``state["max_tokens"]`` remembers the choice for later batches. A request refused
    with 1 token too was refused for another reason (a prompt too long, no echo): that error is the server's, with
    the echo hint only where it speaks of echo or log-probs."""
    import openai

    def call():
        return client.completions.create(model=model, prompt=prompts, echo=True, max_tokens=state["max_tokens"],
                                         logprobs=1, temperature=0)

    what = f"scoring with {model}"
    try:
        return api_call(call, base_url, what, model, passthrough=(openai.BadRequestError,))
    except openai.BadRequestError as e:
        msg = _message(e)
        if state["max_tokens"] == 0:
            state["max_tokens"] = 1
            try:
                resp = api_call(call, base_url, what, model, passthrough=(openai.BadRequestError,))
            except openai.BadRequestError:
                state["max_tokens"] = 0
            else:
                log.warning("%s refused max_tokens=0 (%s); asking for 1 token per prompt and ignoring it", base_url,
                            msg)
                return resp
        hint = f"; {ECHO_HINT}" if any(w in msg.lower() for w in ("echo", "logprob")) else ""
        raise KnnlmError(f"--base_url: {base_url} refused {what} (HTTP {e.status_code}: {msg}){hint}") from None


def score_rows(client, base_url: str, model: str, rows: list[dict], batch_size: int = 16, label: str = "") -> list[dict]:
    """Per row: {"ll": log-likelihood of the target given the prefix, "n_tokens": target tokens, "straddle": bool}."""
    out, state = [], {"max_tokens": 0}
    bar = tqdm(total=len(rows), desc=f"scoring {label}".strip(), unit="ex", leave=False)
    for first in range(0, len(rows), batch_size):
        batch = rows[first: first + batch_size]
        prompts = [r["prefix"] + r["target"] for r in batch]
        resp = _echo_completions(client, base_url, model, prompts, state)
        choices = sorted(resp.choices or [], key=lambda c: c.index)
        if len(choices) != len(batch):
            raise KnnlmError(f"--base_url: {base_url} answered {len(choices)} choices for {len(batch)} prompts; it does "
                             "not support a list of prompts per request; retry with --batch_size 1")
        for row, prompt, choice in zip(batch, prompts, choices):
            lp = choice.logprobs
            if lp is None or not lp.token_logprobs or not lp.text_offset or not lp.tokens:
                raise KnnlmError(f"--base_url: {base_url} returned no log-probabilities for {model}; {ECHO_HINT}")
            shift = (choice.text or "").find(prompt)  # offsets are into the echoed text: prompt (+ a generated token)
            if shift < 0:
                raise KnnlmError(f"--base_url: {base_url} did not echo the prompt {prompt[-60:]!r} (got "
                                 f"{(choice.text or '')[-60:]!r}); scoring needs echo=true support")
            start = shift + len(row["prefix"])
            ll, n, straddle = target_log_likelihood(lp, start, start + len(row["target"]))
            if n == 0:
                raise KnnlmError(f"--base_url: {base_url} returned no token for the target {row['target']!r} of "
                                 f"{prompt!r}; its text_offset values do not cover the prompt")
            out.append({"ll": ll, "n_tokens": n, "straddle": straddle})
        bar.update(len(batch))
    bar.close()
    straddled = sum(r["straddle"] for r in out)
    if straddled:
        log.warning("%s: %d target(s) share a token with their prefix under %s's tokenizer; their scores include "
                    "that token", label, straddled, model)
    return out


def finetune(client, base_url: str, base_model: str, train: Path, valid: Optional[Path], n_epochs: int, seed: int,
             run_dir: Path, poll_s: float, label: str = "", sleep: Callable[[float], None] = time.sleep) -> dict:
    """Uploads ``train`` (and ``valid``), starts a fine-tuning job of ``base_model`` and waits for it; returns its state
    (with ``fine_tuned_model``; ``n_epochs`` 0: the API's default).

    State lives in ``run_dir/job.json``, saved after every step: a rerun with the same base model and training file
    reuses the uploaded files and waits for the same job (or, once it succeeded, asks the API nothing); a failed or
    cancelled job is replaced by a new one.
    """
    spec = {"base_url": base_url, "base_model": base_model, "training_sha256": sha256_file(train),
            "validation_sha256": sha256_file(valid) if valid else None, "n_epochs": n_epochs, "seed": seed}
    state_path = run_dir / "job.json"
    state = reusable(state_path, spec, "spec") or {"spec": spec}

    def save():
        atomic_write_json(state_path, state)

    if "training_file_id" not in state:
        state["training_file_id"] = upload(client, base_url, train)
        save()
    if valid and "validation_file_id" not in state:
        state["validation_file_id"] = upload(client, base_url, valid)
        save()
    if state.get("status") == "succeeded" and state.get("fine_tuned_model"):
        return job_metrics(client, base_url, state, run_dir)
    if "job_id" not in state or state.get("status") in ("failed", "cancelled"):
        for old in run_dir.glob("metrics*.csv"):  # result files of an earlier job
            old.unlink()
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n_epochs or "auto"}}}
        extra = {"validation_file": state["validation_file_id"]} if valid else {}
        job = api_call(lambda: client.fine_tuning.jobs.create(model=base_model, training_file=state["training_file_id"],
                                                              method=method, seed=seed, **extra),
                       base_url, f"starting a fine-tuning job of {base_model}", base_model)
        state.update(job_id=job.id, status=job.status)
        save()
        log.info("%sstarted fine-tuning job %s of %s", label, job.id, base_model)
    job = wait_for_job(client, base_url, state["job_id"], poll_s, label, sleep)
    state.update(status=job.status, fine_tuned_model=job.fine_tuned_model, result_files=list(job.result_files or []),
                 trained_tokens=job.trained_tokens)
    save()
    if job.status != "succeeded" or not job.fine_tuned_model:
        reason = getattr(job.error, "message", None) if job.error else None
        raise KnnlmError(f"--submit: fine-tuning job {job.id} (seed {seed}) ended {job.status}"
                         f"{f' ({reason})' if reason else ''}; fix the cause and rerun to start a new job")
    return job_metrics(client, base_url, state, run_dir)
