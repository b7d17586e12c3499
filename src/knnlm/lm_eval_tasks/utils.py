"""Macondo as lm-evaluation-harness tasks: the data loader and per-example metrics the YAMLs here name.

Run with ``lm_eval --include_path $(python -c "import knnlm.lm_eval_tasks as t; print(t.__path__[0])")
--tasks macondo,macondo_overspecified --metadata data_dir=DIR``, DIR a folder from ``knnlm macondo generate``.
Each example is one loglikelihood request: context = the row's ``prefix``, continuation = its ``target`` (the child's
name with its leading space), exactly what ``knnlm macondo score`` scores.
"""
from __future__ import annotations

from knnlm.errors import KnnlmError
from knnlm.macondo.generate import read_split


def _load(split: str, data_dir=None, **_):
    import datasets

    if not data_dir:
        raise KnnlmError("--metadata: the Macondo tasks need data_dir=DIR (a folder written by `knnlm macondo "
                         "generate`), e.g. --metadata data_dir=runs/macondo")
    try:
        rows = read_split(data_dir, split)
    except KnnlmError as e:  # read_split names knnlm's own flag; here the folder came from lm_eval's --metadata
        raise KnnlmError(str(e).replace("--data: ", "--metadata data_dir: ", 1)) from None
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_test(**kwargs):
    return _load("test", **kwargs)


def load_test_overspecified(**kwargs):
    return _load("test_overspecified", **kwargs)


def process_results(doc, results):
    """``ll``: log p(child's name | prefix); ``acc``: 1 when the name is the greedy continuation."""
    ll, is_greedy = results[0]
    return {"ll": ll, "acc": int(is_greedy)}
