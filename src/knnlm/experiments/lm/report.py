"""`knnlm lm train`'s report: the finished model folder's results.json, results.md and validation-perplexity plot."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ...fileio import atomic_write_json
from .settings import TRAINING_JSON

log = logging.getLogger(__name__)


def save_final(out: Path, work: Path, model, tokenizer, record: dict, started: float) -> None:
    """Writes everything into ``work/final``, moves the files into ``out`` (``training.json`` last), drops ``work``."""
    from ...report import line_plot, markdown_table, write_markdown, write_results

    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    hist = record["history"]
    shown = hist[1:] if len(hist) > 1 else hist  # step 0 (perplexity ~ the vocabulary size) would flatten the curve
    line_plot(final / "val_ppl.png", [{"x": [h["step"] for h in shown], "y": [h["val_ppl"] for h in shown],
                                       "label": "validation perplexity", "marker": "o"}],
              title=f"GPT-2 {record['args']['size']} on {Path(record['args']['train_file']).name} "
                    f"(step 0: {hist[0]['val_ppl']:.0f})", xlabel="step", ylabel="perplexity")
    rows = [[h["step"], h["epoch"], h["train_loss"], h["val_ppl"], h["val_tokens"], h["elapsed_s"]] for h in hist]
    table = markdown_table(["step", "epoch", "train loss", "val ppl", "val tokens", "train s"], rows)
    table += (f"\nFinal: validation perplexity {record['val_ppl']:.2f} per token over all {record['val_tokens']} tokens"
              + (f", {record['val_word_ppl']:.2f} per word" if record["val_word_ppl"] else "") + ".\n")
    if record["train_args"].get("early_stopping_patience") is not None:
        table += (f"Early stopping: {'stopped' if record['stopped_early'] else 'did not stop'} before the step cap "
                  f"(last step {record['steps']}); the model kept is step {record['best_step']}'s (validation "
                  f"perplexity {record['best_val_ppl']:.2f} on the evaluation prefix).\n")
    write_markdown(final, table)
    metrics = {k: record[k] for k in ("val_ppl", "val_word_ppl", "val_loss", "val_tokens", "n_parameters", "vocab_size",
                                      "train_tokens", "steps", "epochs", "train_wall_s", "skipped_rows",
                                      "n_trainable_parameters", "stopped_early", "best_step", "best_val_ppl")}
    metrics["curve"] = [{"step": h["step"], "val_ppl": h["val_ppl"], "train_loss": h["train_loss"]} for h in hist]
    write_results(final, {**record["args"], **record["train_args"]}, metrics, started)
    atomic_write_json(final / TRAINING_JSON, record)
    last = ("config.json", "results.json", TRAINING_JSON)
    names = sorted(p.name for p in final.iterdir() if p.name not in last)
    # config.json late: no loadable half-folder; results.json after it, its markdown and plots (a folder holding
    # results.json is finished); training.json last
    for name in [*names, *last]:
        os.replace(final / name, out / name)
    shutil.rmtree(work)
    log.info("model saved to %s: validation perplexity %.2f", out, record["val_ppl"])
