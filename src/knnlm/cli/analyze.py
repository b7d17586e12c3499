"""`knnlm analyze projection`: can the LM's own last layers express p_knnlm? (Chiang et al. Eq. 2, Tables 1, 3, 4).
`knnlm analyze retomaton`: perplexity against the fraction of saved searches (Alon et al. 2022, Fig. 2)."""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    from ..config import add_command
    from ..corpus import CorpusArgs
    from ..experiments.projection.settings import ProjectionArgs
    from ..experiments.retomaton.settings import RetomatonArgs
    from ..knn import KNNArgs
    from ..models import ModelArgs

    an = sub.add_parser("analyze", help="analyses of an LM against its kNN-LM")
    an_sub = an.add_subparsers(dest="action", required=True)
    add_command(an_sub, "projection", (ModelArgs, CorpusArgs, KNNArgs, ProjectionArgs), cmd_projection,
                help="project p_knnlm onto the output space of f / f∘g (Eq. 2): perplexity and KL of p_proj beside the "
                     "LM and the kNN-LM")
    add_command(an_sub, "retomaton", (ModelArgs, CorpusArgs, RetomatonArgs), cmd_retomaton,
                help="RetoMaton over --min_knns (and with clusters), a kNN-LM skipping searches at random, and the "
                     "kNN-LM: perplexity against the fraction of saved searches (table and figure)")


def cmd_projection(args) -> int:
    from ..config import resolve, save_config, to_dict
    from ..corpus import CorpusArgs
    from ..datastore import Datastore
    from ..fileio import claim_output_dir
    from ..experiments.projection.report import claims, results_table
    from ..experiments.projection.run import remove_partial, run_projection
    from ..experiments.projection.settings import _FREE_KEYS, ProjectionArgs
    from ..experiments.study import check_resumable
    from ..knn import KNNArgs
    from ..models import ModelArgs, load_model
    from ..report import finish_outputs

    margs, cargs, kargs, pargs = resolve([ModelArgs, CorpusArgs, KNNArgs, ProjectionArgs], args, args.config)
    cargs.require("validation")  # a corpus, one only, readable: before the model loads
    kargs.refuse_inactive(datastore=True, memory=False)
    kargs.refuse_stateful("`knnlm analyze projection`")
    own = ("config.json", "results.json", "results.md", "per_token.npz", "partial.*", "tokens.i32*", "*.png")
    claim_output_dir(pargs.output_dir, "analyze projection", None, own_files=own)  # a model, a datastore: refused
    out = Path(pargs.output_dir)
    check_resumable(out, (margs, cargs, kargs, pargs), _FREE_KEYS)  # other settings never replace its results
    started = time.time()
    datastore = Datastore.open(pargs.datastore)
    lm = load_model(margs)
    claim_output_dir(pargs.output_dir, "analyze projection", {}, own_files=own)  # (made only now)
    check_resumable(out, (margs, cargs, kargs, pargs), _FREE_KEYS)  # again under the lock: a run may have finished
    save_config(out, margs, cargs, kargs, pargs)  # first: what a rerun must match to resume (check_resumable)
    metrics = run_projection(lm, cargs, pargs, datastore, kargs)
    found = claims(metrics, "this run")
    table = results_table(metrics, found)
    finish_outputs(out, to_dict(margs, cargs, kargs, pargs), metrics, table, started, claims=[c.record() for c in found])
    remove_partial(out)
    print(table, end="")
    print(f"results: {out / 'results.json'}; KL histograms: {', '.join(str(out / f'kl_{t}.png') for t in pargs.target)}; "
          f"step histograms: {out}/steps_<target>_tol<tol>.png")
    return 0


def cmd_retomaton(args) -> int:
    from ..config import resolve, save_config, to_dict
    from ..corpus import CorpusArgs
    from ..datastore import Datastore
    from ..experiments.retomaton.report import FIGURE, claim, figure, results_table
    from ..experiments.retomaton.run import run_retomaton
    from ..experiments.retomaton.settings import _FREE_KEYS, RetomatonArgs
    from ..experiments.study import check_resumable
    from ..fileio import claim_output_dir
    from ..models import ModelArgs, load_model
    from ..report import finish_outputs

    margs, cargs, rargs = resolve([ModelArgs, CorpusArgs, RetomatonArgs], args, args.config)
    cargs.require("validation")  # a corpus, one only, readable: before the model loads
    # a backend's own settings with another backend (RetoMaton's own act: the study runs RetoMaton rows)
    rargs.knn_args(retomaton=True).refuse_inactive(datastore=True, memory=False)
    own = ("config.json", "results.json", "results.md", FIGURE, "settings", "eval-*")
    claim_output_dir(rargs.output_dir, "analyze retomaton", None, own_files=own)  # a model, a datastore: refused
    out = Path(rargs.output_dir)
    check_resumable(out, (margs, cargs, rargs), _FREE_KEYS)  # other k, λ, corpus, model: refused, not replaced
    started = time.time()
    datastore = Datastore.open(rargs.datastore)
    lm = load_model(margs)
    claim_output_dir(rargs.output_dir, "analyze retomaton", {}, own_files=own)  # (made only now)
    check_resumable(out, (margs, cargs, rargs), _FREE_KEYS)  # again under the lock: a run may have finished meanwhile
    save_config(out, margs, cargs, rargs)  # first: what a rerun must match (check_resumable)
    metrics = run_retomaton(lm, cargs, rargs, datastore)
    found = claim(metrics, "this run")
    table = results_table(metrics, found)
    finish_outputs(out, to_dict(margs, cargs, rargs), metrics, table, started, plots=lambda: figure(out / FIGURE, metrics),
                   claims=[c.record() for c in found])
    print(table, end="")
    print(f"results: {out / 'results.json'}; figure: {out / FIGURE}")
    return 0
