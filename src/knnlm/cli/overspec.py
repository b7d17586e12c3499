"""`knnlm overspec run`: the over-specification study (paper §4.3, Figures 1 and 3, Table 5), and `knnlm overspec api`:
Macondo-Conv through an OpenAI-compatible API (§4.4)."""
from __future__ import annotations

from ..config import add_command


def register(sub) -> None:
    from ..experiments.overspec.api import ApiArgs
    from ..experiments.overspec.settings import OverspecArgs

    group = sub.add_parser("overspec", help="over-specification study: fine-tune on Macondo, vanilla vs kNN vs MLP "
                                            "log-likelihood over training (§4.3)")
    actions = group.add_subparsers(dest="action", required=True)
    add_command(actions, "run", OverspecArgs, cmd_run,
                help="fine-tune per seed, evaluate at step 0 and every --eval_every steps (resumable)",
                description="Example: knnlm overspec run --config configs/cpu-tiny.yaml --output_dir runs/overspec-cpu-tiny")
    add_command(actions, "api", ApiArgs, cmd_api,
                help="Macondo-Conv with an API model (§4.4): fine-tune via an OpenAI-compatible API (--submit) or take a "
                     "fine-tuned model, then score it with echo logprobs")


def cmd_run(args) -> int:
    from ..experiments.overspec.report import METHOD_NAMES
    from ..experiments.overspec.run import run_study
    from ..experiments.overspec.settings import resolve_args

    oargs = resolve_args(vars(args), args.config)
    out = run_study(oargs)
    if "table" not in out:  # a process other than the main one of a launch: the main one writes and reports
        return 0
    m = out["metrics"]
    print(open(out["table"], encoding="utf-8").read(), end="")
    for split in m["splits"]:
        f = m["final"][split]
        shown = [k for k in m["methods"] + ["bare"] if k in f]
        parts = [f"{METHOD_NAMES[k]} {f[k]['avg_groups']:.3f}" for k in shown]
        gaps = [f"{METHOD_NAMES[k]} {f[f'{k}_gap_to_optimum']['avg_groups']:.3f}" for k in shown]
        print(f"{split} at step {m['final']['step']} (average over groups): {', '.join(parts)}; "
              f"gap to log(1/n): {', '.join(gaps)}")
    for path in out["plots"]:
        print(f"plot: {path}")
    print(f"results: {out['results']}")
    return 0


def cmd_api(args) -> int:
    from ..config import resolve
    from ..experiments.overspec.api import ApiArgs, run_study

    out = run_study(resolve(ApiArgs, args, args.config))
    print(out["table"], end="")
    print(f"results: {out['results']}")
    return 0
