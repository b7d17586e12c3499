"""The over-specification study (paper §4.3, Appendix C, Figures 1 and 3, Table 5; docs/overspec.md): per seed a Macondo
village and a model fine-tuned on its over-specified sentences, scored at each evaluation point vanilla, kNN-augmented
(a datastore of the current model) and with an MLP memory, on the bare test prefixes and the control split.

Parts: ``settings`` (OverspecArgs), ``run`` (models, villages, evaluation points, seeds; the run folder's layout is in
docs/overspec.md), ``report`` (aggregation, paired intervals, claims, Table 5, Figure 1), ``api`` (Macondo-Conv
through an OpenAI-compatible API, §4.4; docs/overspec_api.md).
"""
