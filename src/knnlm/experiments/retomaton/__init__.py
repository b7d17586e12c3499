"""The RetoMaton study (Alon et al. 2022, Fig. 2; docs/retomaton.md): perplexity against the fraction of saved searches
for RetoMaton over ``--min_knns`` (with and without clusters) and a kNN-LM that skips searches at random, beside the
kNN-LM that searches at every token.

Parts: ``settings`` (RetomatonArgs, the swept settings), ``run`` (one ``knnlm.evaluate.evaluate`` per setting, each
saved as it finishes and reused on a rerun), ``report`` (results.md's table, the figure, the claim judged from a
block-bootstrap interval, the report part of ``knnlm reproduce``).
"""
