"""`knnlm hurdle run`: the MLP-hurdle study (paper Appendix E, Figures 4 and 5)."""
from __future__ import annotations

from ..config import add_command


def register(sub) -> None:
    from ..experiments.hurdle.settings import HurdleArgs

    hurdle = sub.add_parser("hurdle", help="MLP hurdle: does the last MLP layer slow early training? (Appendix E)")
    hurdle_sub = hurdle.add_subparsers(dest="action", required=True)
    add_command(hurdle_sub, "run", HurdleArgs, cmd_hurdle_run,
                help="train GPT-2 with all MLPs, without the last and without the first (control) on the same data, per "
                     "seed; compare curves (resumable)",
                description="Example: knnlm hurdle run --preset cpu --data macondo --output_dir runs/hurdle-macondo")


def cmd_hurdle_run(args) -> int:
    from ..experiments.hurdle.report import hurdle_claims
    from ..experiments.hurdle.run import run_study
    from ..experiments.hurdle.settings import MODELS, resolve_args

    hargs = resolve_args(vars(args), args.config)
    out = run_study(hargs)
    m = out["metrics"]
    print(f"hurdle ({m['mode']} mode, size {hargs.size}, {len(m['seeds'])} seeds, {hargs.max_steps} steps, {m['device']}): "
          + "; ".join(f"{name} {m['params'][name]:,} parameters" for name in MODELS))
    for claim in hurdle_claims(m, "this run"):
        print("  " + " | ".join(claim.row()))
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot: {path}")
    print(f"results: {out['results']}")
    return 0
