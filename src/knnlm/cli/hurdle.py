"""`knnlm hurdle run`: the MLP-hurdle study (paper Appendix E, Figures 4 and 5)."""
from __future__ import annotations

from ..config import add_command


def register(sub) -> None:
    from ..experiments.hurdle import HurdleArgs

    hurdle = sub.add_parser("hurdle", help="MLP hurdle: does the last MLP layer slow early training? (Appendix E)")
    hurdle_sub = hurdle.add_subparsers(dest="action", required=True)
    add_command(hurdle_sub, "run", HurdleArgs, cmd_hurdle_run,
                help="train GPT-2 with all MLPs, without the last and without the first (control) on the same data, per "
                     "seed; compare curves (resumable)",
                description="Example: knnlm hurdle run --preset cpu --data macondo --output_dir runs/hurdle-macondo")


def cmd_hurdle_run(args) -> int:
    from ..experiments.hurdle import MODELS, resolve_args, run_study

    hargs = resolve_args(vars(args), args.config)
    out = run_study(hargs)
    m = out["metrics"]
    print(f"hurdle ({m['mode']} mode, size {hargs.size}, {len(m['seeds'])} seeds, {hargs.max_steps} steps, {m['device']}): "
          + "; ".join(f"{name} {m['params'][name]:,} parameters" for name in MODELS))
    for key, a in m["areas"].items():
        parts = []
        for name in ("without_last_mlp", "without_first_mlp", "last_minus_first"):
            st = a.get(name, {})
            if st.get("mean") is not None:
                parts.append(f"{name} {st['mean']:+.4f} [{st['ci95'][0]:+.4f}, {st['ci95'][1]:+.4f}]")
        verdict = a.get("last_mlp_speeds_early_learning")
        print(f"  {key}: paired area over steps 0-{m['area_until_step']:g} (mean advantage, 95% CI over seeds): "
              + "; ".join(parts) + f"; last MLP removal speeds early learning: {'–' if verdict is None else verdict}")
    print(f"table: {out['table']}")
    for path in out["plots"]:
        print(f"plot: {path}")
    print(f"results: {out['results']}")
    return 0
