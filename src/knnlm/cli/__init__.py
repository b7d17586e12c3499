"""The ``knnlm`` console command. Each module of this package registers one command group via ``register(subparsers)``."""
from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)
_KEEP_FREED_BYTES = 512 << 20  # free memory at the top of the heap kept for reuse instead of returned to the OS


def keep_freed_memory() -> bool:
    """Makes glibc malloc reuse freed memory instead of returning it to the OS (docs/scaling.md, "Allocator").

    By default every block over 32 MiB (a [256, 50257] float32 logits tensor is 51 MiB) is a fresh mmap, so each
    batch page-faults its tensors in again and unmaps them after; that was a third of `knnlm demo`'s CPU time, as
    system time. With mmap off for allocations (M_MMAP_MAX = 0) and a high trim threshold, big blocks come from the
    heap and are reused. Set KNNLM_MALLOPT=0 to keep glibc's defaults. Returns whether the setting was applied."""
    if os.environ.get("KNNLM_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no such tunables)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
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
