"""`knnlm demo` (the paper's headline result on a laptop) and `knnlm reproduce` (every study, one report)."""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    from ..config import add_command, add_config_flag
    from ..experiments.reproduce import ReproduceArgs

    demo = sub.add_parser("demo", help="Macondo over-specification on a from-scratch GPT-2: vanilla vs kNN vs MLP "
                                       "memory over training (≤ 10 min on 2 CPU cores, nothing downloaded)")
    demo.add_argument("--output_dir", default="runs/knnlm-demo", help="run folder (a rerun resumes; default: runs/knnlm-demo, beside every other run)")
    add_config_flag(demo, default="demo")
    demo.set_defaults(func=cmd_demo)

    add_command(sub, "reproduce", ReproduceArgs, cmd_reproduce,
                help="run the four studies and the kNN-LM baseline at a scale (cpu, gpu, paper); write report.md beside "
                     "the paper's numbers (cached, resumable; --smoke: every stage in seconds on CPU)")


def cmd_demo(args) -> int:
    from . import main

    started = time.time()
    code = main(["overspec", "run", "--config", args.config, "--output_dir", args.output_dir])
    if code:
        return code
    out = Path(args.output_dir)
    print(f"\ndemo finished in {time.time() - started:.0f}s")
    print(f"report: {out / 'results.md'}")
    for png in sorted(out.glob("*.png")):
        print(f"figure: {png}")
    return 0


def cmd_reproduce(args) -> int:
    from ..config import resolve, save_config
    from ..fileio import claim_output_dir
    from ..experiments.reproduce import (ReproduceArgs, check_run_kind, load_timings, run_stages, with_data_dir,
                                         with_smoke_data, write_report)
    from . import main

    started = time.time()
    rargs = resolve(ReproduceArgs, args, args.config)
    out = Path(rargs.output_dir)  # a model, a datastore, another command's run: refused (a run from before the
    # marker is recognised by its stage records); the scale is checked by check_run_kind
    claim_output_dir(out, "reproduce", {}, own_files=("*",) if (out / "stages" / "run.json").is_file() else ())
    rargs = with_smoke_data(with_data_dir(rargs))
    if rargs.report_only:
        check_run_kind(Path(rargs.output_dir), rargs)
        timings = load_timings(Path(rargs.output_dir))
    else:
        save_config(rargs.output_dir, rargs)
        timings = run_stages(rargs, main)
    path = write_report(rargs, timings)
    print(f"reproduce --scale {rargs.scale}{' --smoke' if rargs.smoke else ''}: {len(timings)} stage(s) finished, "
          f"{sum(timings.values()):.0f}s of stage time recorded; this command took {time.time() - started:.0f}s")
    print(f"report: {path}")
    return 0
