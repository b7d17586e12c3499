"""`knnlm overspec run`: the over-specification study (paper §4.3, Figures 1 and 3, Table 5).

The group also carries `knnlm overspec api` (Macondo-Conv through an OpenAI-compatible API) when
``knnlm.experiments.overspec_api`` is installed; that module registers its own subcommand.
"""
from __future__ import annotations

import importlib
import importlib.util

from ..config import add_arguments


def register(sub) -> None:
    from ..experiments.overspec import OverspecArgs

    group = sub.add_parser("overspec", help="over-specification study: fine-tune on Macondo, vanilla vs kNN vs MLP "
                                            "log-likelihood over training (§4.3)")
    actions = group.add_subparsers(dest="action", required=True)
    run = actions.add_parser(
        "run", help="fine-tune per seed, evaluate at step 0 and every --eval_every steps (resumable)",
        description="Example: knnlm overspec run --config configs/cpu-tiny.yaml --output_dir runs/overspec-cpu-tiny")
    run.add_argument("--config", default=None, help="YAML/JSON file setting any of the options below (flags win)")
    add_arguments(run, OverspecArgs)
    run.set_defaults(func=cmd_run)
    if importlib.util.find_spec("knnlm.experiments.overspec_api") is not None:
        importlib.import_module("knnlm.experiments.overspec_api").register_api(actions)


def cmd_run(args) -> int:
    from ..experiments.overspec import METHOD_NAMES, resolve_args, run_study

    oargs = resolve_args(vars(args), args.config)
    out = run_study(oargs)
    m = out["metrics"]
    print(open(out["table"], encoding="utf-8").read(), end="")
    for split in m["splits"]:
        f = m["final"][split]
        shown = [k for k in m["methods"] + ["bare"] if k in f]
        parts = [f"{METHOD_NAMES[k]} {f[k]['avg_groups']:.3f}" for k in shown]
        gaps = [f"{METHOD_NAMES[k]} {f[f'{k}_gap_to_optimum']['avg_groups']:.3f}" for k in shown]
        print(f"{split} at step {m['final']['step']} (average over groups): {', '.join(parts)}; "
              f"gap to log(1/n): {', '.join(gaps)}")
    v = m["verdict"]
    failed = f" (failed: {', '.join(v['failed'])})" if v["failed"] else ""
    print(f"over-specification {'shown' if v['shown'] else 'not shown'}{failed}")
    for path in out["plots"]:
        print(f"plot: {path}")
    print(f"results: {out['results']}")
    return 0
