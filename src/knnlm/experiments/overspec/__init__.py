"""The over-specification study (paper §4.3, Appendix C, Figures 1 and 3, Table 5; docs/overspec.md): per seed a Macondo
village and a model fine-tuned on its over-specified sentences, scored at each evaluation point vanilla, kNN-augmented
(a datastore of the current model) and with an MLP memory, on the bare test prefixes and the control split."""
