"""The own-data MLP-memory study (paper §5, Table 2; docs/mlp_memory.md): is the datastore the LM's own training data,
and how much of kNN's gain does the memory keep? Its runs are library commands (``lm train``, ``datastore build``,
``mlp train``, ``eval``).

Parts: ``check`` (the own-data hash check, the share of kNN's gain), ``report`` (the claims, Table 2's rows).
"""
