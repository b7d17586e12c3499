"""The ``knnlm`` console command. Each module of this package registers one command group via ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ..errors import KnnlmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnlm", description="kNN-LM retrieval augmentation, the MLP memory and the studies of Chiang et al. Every command takes --help and --config FILE|PRESET.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    """Our own progress bars and log lines say what happens; transformers' weight-loading bars and warnings are noise."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # hub retries before our one-line error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_libraries(args.verbose)
    try:
        return args.func(args) or 0
    except KnnlmError as e:
        print(f"knnlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("knnlm: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
