"""User-facing errors: one line naming the file or flag and the fix."""
import math


class KnnlmError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""


def require_finite(flag: str, value: float, minimum: float = 0.0, inclusive: bool = False,
                   maximum: float | None = None) -> None:
    """Refuses ``--flag`` unless it is a finite number above ``minimum`` (or equal to it with ``inclusive``) and, where
    given, at most ``maximum``: NaN fails every comparison and inf passes ``> 0``, and either as a rate or a weight
    trains a NaN model that still looks done."""
    above = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and above and (maximum is None or value <= maximum)):
        bound = (f"{'>=' if inclusive else '>'} {minimum:g}" if maximum is None else
                 f"in {'[' if inclusive else '('}{minimum:g}, {maximum:g}]")
        raise KnnlmError(f"--{flag}: must be a finite number {bound}, got {value}")


def require_in_range(flag: str, value: int, low: int, high: int, note: str = "") -> None:
    """Refuses ``--flag`` outside [low, high]; ``note`` says what the values mean (e.g. " (0 = torch's default)"). The
    upper bound stops a mistyped count (10**14) where the flags are read, instead of where it overflows a C int,
    allocates an array per unit or starts threads until the machine has none left."""
    if value < low:
        raise KnnlmError(f"--{flag}: must be >= {low}{note}, got {value}")
    if value > high:
        raise KnnlmError(f"--{flag}: must be <= {high}{note}, got {value}")


# Threads one flag may start (--workers, --num_threads). Each is an OS thread started up front; far past the cores they
# only hold stacks, and a mistyped 10**14 would hang the server starting them, or overflow torch's C int.
THREAD_LIMIT = 1024

SEED_LIMIT = 2 ** 32  # np.random.seed takes [0, 2**32); numpy's generators and faiss refuse negative seeds


def require_seed(flag: str, value: int) -> None:
    """Refuses ``--flag`` unless it is a seed every seeded library takes: numpy rejects a negative seed (and
    ``np.random.seed`` one from 2**32 up) only where it is first used, often after the model is loaded or the run's
    work is done."""
    if not 0 <= value < SEED_LIMIT:
        raise KnnlmError(f"--{flag}: must be in [0, 2**32), got {value}")
