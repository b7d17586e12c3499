"""The hurdle study's runs: the three models of a seed, each trained on ``knnlm.train``'s loop with the hurdle's batches,
schedule (:func:`lr_at`) and per-step records, evaluated at the eval points; ``run_study`` runs every seed (resuming)."""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...fileio import claim_output_dir
from ...train import train
from ..study import check_resumable, finish_run, read_finished, seed_path
from .data import Examples, StudyData, ScoringLM, batch_indices, load_tokenizer, prepare_data
from .report import aggregate, write_outputs
from .settings import _FREE_KEYS, MODELS, HurdleArgs

log = logging.getLogger(__name__)


class ZeroMLP(nn.Module):
    """Stands in for a removed feed-forward sublayer: returns zeros, so the block adds nothing to the residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        return torch.zeros_like(x)


def gpt2_config(size: str, vocab_size: int, n_positions: int, eos_token_id: int, n_layer: int = 0, n_embd: int = 0,
                n_head: int = 0):
    """The GPT2Config of a named from-scratch size (``knnlm.assets.scratch_config``) with this vocabulary and shape."""
    from ...assets import scratch_config

    config = scratch_config(size, n_positions=max(1024, n_positions))  # GPT-2's context, as the paper's models
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        if value:
            setattr(config, key, value)
    config.vocab_size = vocab_size
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_token_id
    return config


def remove_mlp(model, block_index: int) -> nn.Module:
    """In place: block ``block_index``'s feed-forward sublayer (ln_2 and mlp) becomes a pass-through of the residual."""
    block = model.transformer.h[block_index]
    block.mlp = ZeroMLP()
    block.ln_2 = nn.Identity()
    return model


def build_pair(config, seed: int) -> dict[str, nn.Module]:
    """The models of one seed (``MODELS``): the same initial weights everywhere they share (the pruned ones are copies;
    the control loses the first block's MLP instead of the last's: the same parameters, another place)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    full = GPT2LMHeadModel(config)
    full.loss_type = "ForCausalLM"  # transformers warns when it has to guess
    return {"with_last_mlp": full, "without_last_mlp": remove_mlp(copy.deepcopy(full), -1),
            "without_first_mlp": remove_mlp(copy.deepcopy(full), 0)}


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def mean_loss(model: nn.Module, blocks: Examples, batch_size: int, device: torch.device) -> float:
    """Mean next-token negative log-likelihood over every block (token-weighted). Gold log-probs come from the shared
    kernel (``knnlm.scoring``) on the body's last hidden states, summed in float64: no [B, T, V] tensor is kept."""
    from ...scoring import head_gold_log_probs

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids, _, _ = blocks.batch(np.arange(start, min(start + batch_size, len(blocks))))
        ids = ids.to(device)
        hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]  # [B, T, d]
        logp = head_gold_log_probs(model.get_output_embeddings(), hidden[:, :-1].flatten(0, 1),
                                   ids[:, 1:].flatten())  # [B * (T - 1)]
        total, count = total - float(logp.double().sum()), count + logp.numel()
    model.train(was_training)
    return total / count


def evaluate_point(model: nn.Module, data: StudyData, args: HurdleArgs, device: torch.device) -> dict[str, float]:
    """The metrics of one eval point. Macondo (``knnlm.macondo.score``): ll_<n> per number of children n, ll_avg_groups
    (mean of the group means: the paper's Average) and ll_avg (mean over children). Text: val_loss."""
    if data.mode == "macondo":
        from ...macondo.score import score_split, summarize

        was_training = model.training
        model.eval()
        lls = score_split(ScoringLM(data.tokenizer, data.vocab, model, device), data.rows,
                          batch_size=args.eval_batch_size)["lm"]
        model.train(was_training)
        summary = summarize(data.rows, lls)
        return {"ll_avg_groups": summary["avg_groups"], "ll_avg": summary["avg"],
                **{f"ll_{n}": v for n, v in summary.items() if n.isdigit()}}
    return {"val_loss": mean_loss(model, data.val_blocks, args.eval_batch_size, device)}


# ---------------------------------------------------------------------------------------------------------------- training
def lr_at(step: int, args: HurdleArgs) -> float:
    """Learning rate of update ``step`` (1-based): linear warm-up to --learning_rate, then linear decay to 0 at
    --max_steps."""
    warm = args.warmup_steps
    if step <= warm:
        return args.learning_rate * step / max(1, warm)
    return args.learning_rate * max(0.0, (args.max_steps - step) / max(1, args.max_steps - warm))


def _batches(data: StudyData, args: HurdleArgs):
    """``knnlm.train``'s data: one unending stream per seed, batch k = :func:`batch_indices` of step k (epochs are the
    hurdle's own: a batch may straddle two)."""
    def stream(epoch: int, seed: int):
        for step in itertools.count():
            ids, mask, labels = data.train.batch(batch_indices(len(data.train), args.batch_size, seed, step))
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return stream


# the fields of a finished run's record (runs/seed-S-<model>.json) that aggregating the seeds indexes
RECORD_FIELDS = ("evals", "curve", "data_digest")


def train_one(model: nn.Module, name: str, seed: int, data: StudyData, args: HurdleArgs, run_dir: Path,
              device: torch.device) -> dict:
    """Trains one (seed, model) run on ``knnlm.train``'s loop, resuming from its checkpoint folder; -> its record
    (metrics per eval step, the smoothed loss curve, the digest of the batches fed), kept in ``seed-<s>-<name>.json``
    once finished (``study.finish_run``)."""
    done_path = seed_path(run_dir, seed, f"-{name}.json")
    if done_path.is_file():
        return read_finished(done_path, RECORD_FIELDS)
    ckpt_dir = seed_path(run_dir, seed, f"-{name}")
    old_ckpt = run_dir / f"seed{seed}-{name}.pt"  # the checkpoint of the hurdle's former own training loop
    if old_ckpt.is_file() and not ckpt_dir.exists():
        log.warning("%s: a checkpoint of the hurdle's earlier training loop; seed %d %s restarts from step 0 "
                    "(the same numbers: the run is seeded)", old_ckpt, seed, name)
    model.to(device).train()  # before the optimizer is built: on a GPU it takes the fused AdamW kernel, as it did
    eval_at = set(args.eval_steps())
    # the hooks' running values, checkpointed by the loop: ema of the loss, digest chaining the batches fed
    # (d_k = sha256(d_{k-1} + input_ids_k)) and the record under construction
    extra = {"ema": 0.0, "smoothed": None, "digest": "",
             "record": {"seed": seed, "model": name, "params": count_params(model), "device": device.type,
                        "evals": {}, "curve": {}}}

    def on_step(step: int, loss: float, group: list[dict]) -> None:
        digest = hashlib.sha256(bytes.fromhex(extra["digest"]) + group[0]["input_ids"].numpy().tobytes())
        extra["digest"] = digest.hexdigest()
        extra["ema"] = args.ema_beta * extra["ema"] + (1 - args.ema_beta) * loss
        extra["smoothed"] = extra["ema"] / (1 - args.ema_beta ** step)
        if step % args.log_every == 0 or step in eval_at:
            extra["record"]["curve"][str(step)] = extra["smoothed"]

    def on_eval(step: int, model: nn.Module) -> dict:
        metrics = evaluate_point(model, data, args, device)
        evals = {**metrics, "train_loss": None} if step == 0 else {"train_loss": extra["smoothed"], **metrics}
        extra["record"]["evals"][str(step)] = evals
        if step:
            log.info("seed %d %s step %d/%d: %s", seed, name, step, args.max_steps,
                     ", ".join(f"{k} {v:.4f}" for k, v in evals.items() if not k[3:].isdigit()))
        return evals

    history = train(model, _batches(data, args), args.train_args(seed), ckpt_dir, eval_every=args.eval_every,
                    on_eval=on_eval, progress_desc=f"seed {seed} {name}", on_step=on_step, extra_state=extra,
                    lr_schedule=functools.partial(lr_at, args=args), device=device.type,
                    fused_adamw=device.type == "cuda")
    record = extra["record"]
    # (the checkpoint's: a killed run may resume on another device; one checkpointed before devices were recorded: unknown)
    started_on = record.get("device", "unrecorded")
    record["device"] = started_on if started_on == device.type else f"{started_on},{device.type}"
    record["train_s"] = history[-1]["elapsed_s"]  # training time, evaluations excluded
    record["data_digest"] = extra["digest"]
    old_ckpt.unlink(missing_ok=True)
    return finish_run(done_path, record, ckpt_dir)


# ---------------------------------------------------------------------------------------------------------------- study
def run_study(args: HurdleArgs) -> dict:
    """Trains every model of every seed (resuming), aggregates and writes results.json, results.md and PNGs;
    -> ``{"results": path, "table": path, "plots": [paths], "metrics": metrics}``."""
    from ...config import save_config

    started = time.time()
    out = Path(args.output_dir)
    # a model, a datastore, another run: refused (a folder from before the run marker holds only these names)
    claim_output_dir(out, "hurdle run", {}, own_files=("config.json", "results.json", "results.md", "*.png", "runs",
                                                       "data", "macondo"))
    check_resumable(out, args, _FREE_KEYS)  # (its own earlier run: the settings must match)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = args.resolved_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = load_tokenizer()
    data = prepare_data(args, tokenizer)
    n_positions = args.block_size if data.mode == "text" else max(len(s) for s in data.train.seqs)
    config = gpt2_config(args.size, data.vocab.size, n_positions, data.eos_id, args.n_layer, args.n_embd, args.n_head)
    save_config(out, args)
    run_dir = out / "runs"
    run_dir.mkdir(exist_ok=True)
    params = {name: count_params(model) for name, model in build_pair(config, 0).items()}
    for name, n in params.items():
        log.info("%s: %d parameters", name, n)
    records: dict[str, dict[int, dict]] = {m: {} for m in MODELS}
    for seed in range(args.num_seeds):
        done = {name: seed_path(run_dir, seed, f"-{name}.json") for name in MODELS}
        if all(p.is_file() for p in done.values()):  # a finished seed: nothing to build
            runs = {name: read_finished(p, RECORD_FIELDS) for name, p in done.items()}
        else:
            runs = {name: train_one(model, name, seed, data, args, run_dir, device)
                    for name, model in build_pair(config, seed).items()}
        for name, record in runs.items():
            records[name][seed] = record
    metrics = aggregate(records, args, data)
    # a resumed study may have run its seeds on other devices (other numerics: TF32, the fused AdamW): each names its own
    devices = sorted({d for runs in records.values() for r in runs.values() for d in r.get("device", device.type).split(",")})
    if len(devices) > 1:
        log.warning("hurdle: the seeds ran on %s (runs/seed-*.json name each one's device)", " and ".join(devices))
    metrics.update(params=params, vocab_size=data.vocab.size, train_examples=len(data.train), device=",".join(devices))
    paths = write_outputs(out, args, metrics, started)
    return {**paths, "metrics": metrics}
