"""The ``knnlm`` console command. Each module of this package registers one command group via ``register(subparsers)``."""
from __future__ import annotations

import argparse
import ctypes
import errno
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import traceback

from ..errors import KnnlmError


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a choice not offered, a missing argument) in one line, as every other
    error: argparse printed its usage block above the message (two to six lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="knnlm", description="kNN-LM retrieval augmentation, the MLP memory and the studies of Chiang et al. Every command takes --help and --config FILE|PRESET.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="on an error, also print the Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def bool_values_given(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``true`` after each boolean flag that a command's positional argument follows: a boolean flag
    takes an optional value (``--overwrite`` or ``--overwrite false``), so in ``index build --overwrite DS`` argparse
    alone would take DS as its value and then say the datastore is missing."""
    from ..config import FALSE_WORDS, TRUE_WORDS

    i = 0
    while i < len(argv):  # down the command words (``index build``) to the command's own parser
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not commands:
            break
        if not argv[i].startswith("-"):
            if argv[i] not in commands[0].choices:
                return argv
            parser = commands[0].choices[argv[i]]
        i += 1
    if not any(not a.option_strings for a in parser._actions):
        return argv  # no positional argument: a word after a boolean flag is its value (or a mistyped one)
    flags = {s for a in parser._actions if a.nargs == "?" and a.const == "true" for s in a.option_strings}
    out = argv[:i]
    for j in range(i, len(argv)):
        out.append(argv[j])
        following = argv[j + 1] if j + 1 < len(argv) else "-"
        if argv[j] in flags and not following.startswith("-") and following.lower() not in TRUE_WORDS + FALSE_WORDS:
            out.append("true")
    return out


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`, a time limit), raised where the command is, as Ctrl-C's KeyboardInterrupt
    is: the command stops as it does on Ctrl-C (output folders released, the last checkpoint kept) and says so."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _stop_again(unraisable) -> None:
    """``sys.unraisablehook`` while a command runs: a stop signal whose exception was raised in a finalizer or weakref
    callback (where Python prints it and drops it, so the command ran on and exited 0) is sent again, to be raised
    where the command is."""
    sys.__unraisablehook__(unraisable)
    if isinstance(unraisable.exc_value, KeyboardInterrupt):  # sent a moment later: its handler runs after this hook
        sig = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        timer = threading.Timer(0.01, os.kill, (os.getpid(), sig))
        timer.daemon = True
        _resends.append(timer)
        timer.start()


_resends: list = []  # stop signals to send again; cancelled when the command has ended (it finished its work)


_depth = 0  # main() inside main(): `knnlm reproduce` runs its stages in its own process


def main(argv: list[str] | None = None) -> int:
    global _depth
    on_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can be set only there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    previous_hook, sys.unraisablehook = sys.unraisablehook, _stop_again if on_main_thread else sys.unraisablehook
    _depth += 1
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        if _depth > 1:  # a stage: the outer command reports it (and stops its other stages)
            raise
        return _stopped(e, "; rerun the same command to resume")
    finally:
        _depth -= 1
        sys.unraisablehook = previous_hook
        if _depth == 0:
            while _resends:
                _resends.pop().cancel()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _stopped(e: KeyboardInterrupt, resume: str = "") -> int:
    """Says how the command was stopped; the exit code is the shell's for that signal (128 + its number)."""
    if isinstance(e, Terminated):
        print(f"knnlm: stopped by SIGTERM{resume}", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"knnlm: interrupted{resume}", file=sys.stderr)
    return 128 + signal.SIGINT


def _main(argv: list[str] | None) -> int:
    try:  # the parser imports every command and _quiet_libraries transformers: seconds a Ctrl-C can land in
        keep_freed_memory()
        parser = build_parser()
        args = parser.parse_args(bool_values_given(parser, list(sys.argv[1:] if argv is None else argv)))
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        _quiet_libraries(args.verbose)
    except KeyboardInterrupt as e:  # nothing has started yet, so nothing to resume
        return _stopped(e)
    from ..fileio import abandon_fresh_claims, fresh_claims, git_hash, held_locks, release_output_dirs

    git_hash()  # the code this process runs, before any work: results.json records it (run_info)
    outer = fresh_claims()  # a stage of `knnlm reproduce` runs here, inside the command that claimed its folder
    held = held_locks()  # (and inside the command's lock, which a stage must not release)
    try:
        return args.func(args) or 0
    except Exception as e:  # noqa: BLE001 -- the CLI boundary: one line, the traceback only with --debug
        if args.debug:
            traceback.print_exc()
        abandon_fresh_claims(keep=outer)  # a run that stopped before any work leaves no claim on its new folder
        print(f"knnlm: error: {_one_line(e, args)}", file=sys.stderr)
        return 2 if isinstance(e, (KnnlmError, OSError, MemoryError, UnicodeDecodeError)) or _out_of_memory(e) else 1
    finally:
        release_output_dirs(held_locks() - held)  # the output folders this command locked


_OS_FIXES = {errno.ENOSPC: "free some space (or choose another folder) and rerun the same command to resume",
             errno.EDQUOT: "free some space (or choose another folder) and rerun the same command to resume",
             errno.EACCES: "check the permissions or choose another folder",
             errno.EPERM: "check the permissions or choose another folder",
             errno.EROFS: "choose a writable folder"}


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or torch's failed allocation: torch.OutOfMemoryError (CUDA) and the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), neither of them a MemoryError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


# Flags that bound a command's working memory, in the order its out-of-memory advice names them (those it has).
MEMORY_FLAGS = ("batch_size", "max_tokens", "micro_batch_tokens", "eval_batch_size", "mlp_batch_tokens", "chunk_keys",
                "add_chunk")


def _out_of_memory_fix(args: argparse.Namespace | None) -> str:
    """The advice for a command that ran out of memory: the flags it has that bound its memory (another command's
    --batch_size is no fix), else what any command can do."""
    flags = [f"--{name}" for name in MEMORY_FLAGS if args is not None and name in vars(args)]
    if not flags:
        return "free memory (other jobs) or use a machine with more, and rerun the same command"
    return f"use a smaller {' or '.join(flags[:2])} (or a smaller model or setting) and rerun the same command"


def _one_line(e: BaseException, args: argparse.Namespace | None = None) -> str:
    """The message of an error in one line. Library code raises ``KnnlmError`` for what it can check; an ``OSError``
    that escapes it (a full disk or a read-only folder met mid-run) names its path; anything else is a bug."""
    if isinstance(e, KnnlmError):
        return " ".join(str(e).split("\n"))
    if isinstance(e, OSError):
        where = e.filename or "a file"
        fix = _OS_FIXES.get(e.errno, "check the path and rerun the same command")
        return f"{e.strerror or e}: {where}; {fix}"
    if isinstance(e, UnicodeDecodeError):  # an input file read without knnlm.corpus (which names file and byte)
        return (f"an input file is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start} of a read); "
                "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    if _out_of_memory(e):
        return f"out of memory; {_out_of_memory_fix(args)}"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"internal error ({type(e).__name__}: {first}); rerun with --debug for the traceback and report it"


if __name__ == "__main__":
    sys.exit(main())
