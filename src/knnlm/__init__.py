"""knnlm: kNN-LM retrieval augmentation, the MLP memory, and the studies of Chiang et al."""

__version__ = "0.1.0"


def __getattr__(name):  # knnlm.augment / knnlm.detach without importing torch on `import knnlm`
    if name in ("augment", "detach"):
        from . import augmented

        return getattr(augmented, name)
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")
