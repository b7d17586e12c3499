"""`knnlm lm train`: a from-scratch GPT-2 trained on a text file (resumable), saved as an HF model folder."""
from __future__ import annotations

from pathlib import Path

from ..config import add_command, resolve


def register(sub) -> None:
    from ..experiments.lm.settings import LMArgs, LMTrainArgs

    lm = sub.add_parser("lm", help="train a small GPT-2 language model from scratch (e.g. on WikiText-2)")
    lm_sub = lm.add_subparsers(dest="action", required=True)
    add_command(lm_sub, "train", (LMArgs, LMTrainArgs), cmd_lm_train,
                help="tokenizer + random-init GPT-2 + training with validation perplexity; rerun the same command to "
                     "resume")


def cmd_lm_train(args) -> int:
    from ..experiments.lm.run import train_lm
    from ..experiments.lm.settings import LMArgs, LMTrainArgs
    from ..report import markdown_table

    largs, targs = resolve([LMArgs, LMTrainArgs], args, args.config)
    record = train_lm(largs, targs)
    out = Path(largs.output_dir)
    rows = [[h["step"], h["train_loss"], h["val_ppl"], h["elapsed_s"]] for h in record["history"]]
    print(markdown_table(["step", "train loss", "val ppl", "train s"], rows), end="")
    word = record.get("val_word_ppl")
    print(f"GPT-2 {largs.size}, {record['n_parameters']:,} parameters, vocabulary {record['vocab_size']}: "
          f"validation perplexity {record['val_ppl']:.2f} per token"
          + (f", {word:.2f} per word" if word else "")
          + (f" of the kept step {record['best_step']}" if targs.early_stopping_patience is not None else "")
          + f"; trained {record['steps']} steps ({record['epochs']:.2f} epochs, {record['train_wall_s']:.0f}s)")
    if targs.early_stopping_patience is not None:
        print(f"early stopping: {'stopped' if record['stopped_early'] else 'not stopped'} before the step cap; kept "
              f"step {record['best_step']} (validation perplexity {record['best_val_ppl']:.2f} on the evaluation prefix)")
    print(f"model: {out}  (results: {out / 'results.json'})")
    return 0
