"""`knnlm hurdle run`: the MLP-hurdle study (paper Appendix E, Figures 4 and 5)."""
from __future__ import annotations

from ..config import add_arguments, add_config_flag


def register(sub) -> None:
    from ..experiments.hurdle import HurdleArgs

    hurdle = sub.add_parser("hurdle", help="MLP hurdle: does the last MLP layer slow early training? (Appendix E)")
    hurdle_sub = hurdle.add_subparsers(dest="action", required=True)
    run = hurdle_sub.add_parser(
        "run", help="train GPT-2 with and without its last MLP on the same data, per seed; compare curves (resumable)",
        description="Example: knnlm hurdle run --preset cpu --data macondo --output_dir runs/hurdle-macondo")
    add_config_flag(run)
    add_arguments(run, HurdleArgs)
    run.set_defaults(func=cmd_hurdle_run)


def cmd_hurdle_run(args) -> int:
    from ..experiments.hurdle import MODELS, resolve_args, run_study

    hargs = resolve_args(vars(args), args.config)
    out = run_study(hargs)
    m = out["metrics"]
    print(f"hurdle ({m['mode']} mode, size {hargs.size}, {len(m['seeds'])} seeds, {hargs.steps} steps, {m['device']}): "
          + "; ".join(f"{name} {m['params'][name]:,} parameters" for name in MODELS))
    for key, c in m["comparison"].items():
        adv = c["advantage_at_quarter"]
        print(f"  {key}: lead changes at step(s) {c['crossings'] or 'none'}; advantage of without_last_mlp at step "
              f"{c['quarter_step']}: {'–' if adv is None else f'{adv:+.4f}'}")
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot: {path}")
    print(f"results: {out['results']}")
    return 0
