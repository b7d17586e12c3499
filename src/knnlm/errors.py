"""User-facing errors: one line naming the file or flag and the fix."""
import math


class KnnlmError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""


def require_finite(flag: str, value: float, minimum: float = 0.0, inclusive: bool = False) -> None:
    """Refuses ``--flag`` unless it is a finite number above ``minimum`` (or equal to it with ``inclusive``): NaN fails
    every comparison and inf passes ``> 0``, and either as a rate or a weight trains a NaN model that still looks done."""
    if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
        raise KnnlmError(f"--{flag}: must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {value}")


SEED_LIMIT = 2 ** 32  # np.random.seed takes [0, 2**32); numpy's generators and faiss refuse negative seeds


def require_seed(flag: str, value: int) -> None:
    """Refuses ``--flag`` unless it is a seed every seeded library takes: numpy rejects a negative seed (and
    ``np.random.seed`` one from 2**32 up) only where it is first used, often after the model is loaded or the run's
    work is done."""
    if not 0 <= value < SEED_LIMIT:
        raise KnnlmError(f"--{flag}: must be in [0, 2**32), got {value}")
