"""`knnlm demo` (the paper's headline result on a laptop) and `knnlm reproduce` (every study, one report)."""
from __future__ import annotations

import json
import time
from pathlib import Path


def register(sub) -> None:
    from ..config import add_command, add_config_flag
    from ..experiments.reproduce import ReproduceArgs

    demo = sub.add_parser("demo", help="Macondo over-specification on the paper's setting: SmolLM2-135M fine-tuned on a "
                                       "village, vanilla vs kNN vs MLP memory over training, judged by the claims "
                                       "(~10 min on 2 CPU cores, nothing downloaded; --config demo-scratch: a "
                                       "from-scratch GPT-2)")
    demo.add_argument("--output_dir", default=None, help="run folder (a rerun resumes; default: runs/knnlm-demo, beside "
                                                         "every other run, runs/knnlm-<config> for another --config; "
                                                         "-smoke appended with --smoke)")
    demo.add_argument("--smoke", nargs="?", const="true", default="false", metavar="SMOKE",
                      help="shrink the run to seconds (a village of a few sentences, 2 training steps: the overrides "
                           "`reproduce --smoke` gives `overspec run`): checks that the demo runs; its numbers mean "
                           "nothing (default: false)")
    add_config_flag(demo, default="demo")
    demo.set_defaults(func=cmd_demo)

    add_command(sub, "reproduce", ReproduceArgs, cmd_reproduce,
                help="run every registered study (projection, over-specification, MLP memory, hurdle, RetoMaton...) "
                     "and the kNN-LM baseline at a scale (cpu, gpu, paper); write report.md beside the paper's numbers "
                     "(cached, resumable; --smoke: every stage shrunk to seconds of work)")


def cmd_demo(args) -> int:
    from ..claims import from_record
    from ..config import bool_flag
    from ..experiments.reproduce import SMOKE_OVERRIDES, override_flags
    from . import main

    started = time.time()
    smoke = bool_flag("smoke", args.smoke)
    # a folder per config: the study refuses a folder of other settings, so demo-scratch after demo needs its own
    name = "knnlm-demo" if args.config == "demo" else f"knnlm-{Path(args.config).stem}"
    out = Path(args.output_dir or f"runs/{name}{'-smoke' if smoke else ''}")
    argv = ["overspec", "run", "--config", args.config, "--output_dir", str(out)]
    code = main(override_flags(argv, SMOKE_OVERRIDES["overspec run"]) if smoke else argv)
    if code:
        return code
    print(f"\ndemo finished in {time.time() - started:.0f}s{' (smoke run: its numbers mean nothing)' if smoke else ''}")
    claims = [from_record(rec) for rec in json.loads((out / "results.json").read_text())["claims"]]
    print("verdicts (each from its 95% interval against the claim's threshold; knnlm.claims):")
    for claim in claims:
        _, _, criterion, value, verdict = claim.row()
        print(f"- {verdict}: {claim.claim} [{value}; {criterion}]")
    print(f"report: {out / 'results.md'}")
    for png in sorted(out.glob("*.png")):
        print(f"figure: {png}")
    return 0


def check_stage_commands(recipe: dict, rargs) -> None:
    """Every stage's command line parses with the real parser before any stage runs: a typo in a late stage fails now,
    not after hours of the earlier ones."""
    import contextlib
    import io

    from ..errors import KnnlmError
    from ..experiments.reproduce import stage_argv
    from . import bool_values_given, build_parser

    parser = build_parser()
    for stage in recipe["stages"]:
        argv, err = stage_argv(stage, rargs), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(bool_values_given(parser, argv))  # as `main` reads the stage's argv
        except SystemExit:
            why = (err.getvalue().strip().splitlines() or ["it does not parse"])[-1]
            raise KnnlmError(f"--recipe: {rargs.recipe or f'the {rargs.scale} recipe'}: stage {stage['name']}: "
                             f"`knnlm {' '.join(argv)[:120]}`: {why}; fix the stage's argv") from None


def cmd_reproduce(args) -> int:
    from ..config import resolve, save_config
    from ..errors import KnnlmError
    from ..fileio import claim_output_dir
    from ..experiments.reproduce import (ReproduceArgs, check_data_dir, check_run_kind, current_times, load_timings,
                                         read_recipe, run_stages, with_data_dir, with_smoke_data, write_report)
    from . import main

    started = time.time()
    rargs = resolve(ReproduceArgs, args, args.config)
    out = Path(rargs.output_dir)  # a model, a datastore, another command's run: refused (a run from before the
    # marker is recognised by its stage records); the scale is checked by check_run_kind
    ran = any((out / "stages" / name).is_file() for name in ("run.json", "timings.json"))  # (older runs: no run.json)
    if rargs.report_only and not ran:  # it would write a report of no run, every claim "not run yet"
        raise KnnlmError(f"--report_only: {out} holds no reproduce run (no stages/ records); pass the --output_dir of "
                         "a run, or drop --report_only to run the recipe")
    recipe = read_recipe(rargs)  # read once: a recipe edited during a long run does not change its report
    claim_output_dir(out, "reproduce", {}, own_files=("*",) if (out / "stages" / "run.json").is_file() else ())
    rargs = with_data_dir(rargs)
    check_data_dir(recipe, rargs)
    rargs = with_smoke_data(rargs)
    if rargs.report_only:
        check_run_kind(Path(rargs.output_dir), rargs)
        timings = load_timings(Path(rargs.output_dir))
    else:
        check_stage_commands(recipe, rargs)
        save_config(rargs.output_dir, rargs)
        timings = run_stages(rargs, main, recipe)
    path = write_report(rargs, timings, recipe)
    timings = current_times(recipe, rargs, timings)  # (as the report's Stages table)
    print(f"reproduce --scale {rargs.scale}{' --smoke' if rargs.smoke else ''}: {len(timings)} stage(s) finished, "
          f"{sum(timings.values()):.0f}s of stage time recorded; this command took {time.time() - started:.0f}s")
    print(f"report: {path}")
    return 0
