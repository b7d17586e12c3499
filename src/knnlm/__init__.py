"""knnlm: kNN-LM retrieval augmentation, the MLP memory, and the studies of Chiang et al."""

__version__ = "0.1.0"
