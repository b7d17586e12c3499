"""The MLP-hurdle study (paper Appendix E, Figures 4 and 5; docs/hurdle.md): does the last block's MLP slow early
training? GPT-2 with every MLP, without the last and without the first (the control), same initial weights and batches
per seed, compared by the paired area over the first ``--area_fraction`` of training."""
