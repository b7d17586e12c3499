"""lm-evaluation-harness on the kNN-LM: the Macondo task through HFLM (augmented model in process) and through
local-completions against a live `knnlm serve` on 127.0.0.1 give knnlm's own Macondo scores (macondo/score.py)."""
import pytest

lm_eval = pytest.importorskip("lm_eval")

from knnlm.augmented import augment, detach  # noqa: E402
from knnlm.corpus import CorpusArgs  # noqa: E402
from knnlm.datastore import build_datastore  # noqa: E402
from knnlm.knn import KNNArgs, Retriever  # noqa: E402
from knnlm.lm_eval_tasks import TASKS_DIR  # noqa: E402
from knnlm.macondo.generate import MacondoArgs, generate_macondo, read_split  # noqa: E402
from knnlm.macondo.score import score_split  # noqa: E402
from knnlm.models import ModelArgs, load_model  # noqa: E402
from knnlm.serve import ServeArgs  # noqa: E402
from knnlm.serve_http import start_server  # noqa: E402

K, LMBDA, TEMP = 16, 0.4, 5.0


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, tmp_path_factory):
    """A private tiny GPT-2, a small Macondo village, a datastore over its training split, knnlm's own scores."""
    tmp = tmp_path_factory.mktemp("lmeval")
    lm = load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))
    village = generate_macondo(MacondoArgs(seed=1, output_dir=str(tmp / "village"), num_villagers=40, num_parents=4,
                                           max_children=3, examples_per_child=1, tokenizer="gpt2", format="plain"))
    ds = build_datastore(lm, CorpusArgs(train_file=str(village / "train.jsonl"), block_size=32, stride=16),
                         tmp / "ds")
    knn = KNNArgs(k=K, lmbda=[LMBDA], knn_temp=TEMP)
    scores = {split: score_split(lm, read_split(village, split), retriever=Retriever(ds, knn), knn=knn)
              for split in ("test", "test_overspecified")}
    return lm, village, ds, scores


def _harness_lls(model, village) -> dict:
    """Per-example log-likelihoods of the two Macondo tasks, in file order: {split: [ll, ...]}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(village)})
    res = simple_evaluate(model=model, tasks=["macondo", "macondo_overspecified"], task_manager=tm, log_samples=True)
    out = {}
    for task, split in (("macondo", "test"), ("macondo_overspecified", "test_overspecified")):
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        out[split] = [s["resps"][0][0][0] for s in samples]
        assert res["results"][task]["ll,none"] == pytest.approx(sum(out[split]) / len(out[split]), abs=1e-6)
    return out


def test_hflm_on_augmented_model_equals_knnlm_scores(setup):
    from lm_eval.models.huggingface import HFLM

    lm, village, ds, scores = setup
    model = augment(lm, datastore=ds, k=K, lmbda=LMBDA, knn_temp=TEMP)
    try:
        got = _harness_lls(HFLM(pretrained=model, tokenizer=lm.tokenizer, batch_size=4), village)
    finally:
        detach(model)
    for split, lls in got.items():
        assert len(lls) == len(read_split(village, split)) == 7
        assert lls == pytest.approx([float(x) for x in scores[split]["knn"][LMBDA]], abs=1e-4)
        assert lls != pytest.approx([float(x) for x in scores[split]["lm"]], abs=1e-3)  # the store matters
    plain = _harness_lls(HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4), village)
    assert plain["test"] == pytest.approx([float(x) for x in scores["test"]["lm"]], abs=1e-4)


def test_local_completions_against_knnlm_serve_equals_knnlm_scores(setup, tiny_gpt2_dir):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm, village, ds, scores = setup
    augment(lm, datastore=ds, k=K, lmbda=LMBDA, knn_temp=TEMP)
    srv, thread = start_server(lm, ServeArgs(port=0, served_model_name="knn-tiny"))
    try:
        api = LocalCompletionsAPI(model="knn-tiny", base_url=srv.url + "/completions", tokenizer_backend="huggingface",
                                  tokenizer=str(tiny_gpt2_dir), max_retries=1)
        got = _harness_lls(api, village)
        # generation through the harness's API client: greedy continuation of the kNN-LM, cut at the stop string
        out = api.generate_until([lm_eval.api.instance.Instance(
            "generate_until", {}, ("the cat", {"until": ["\n"], "max_gen_toks": 5}), 0)])
        assert isinstance(out[0], str) and "\n" not in out[0]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
        detach(lm.model)
    for split, lls in got.items():
        assert lls == pytest.approx([float(x) for x in scores[split]["knn"][LMBDA]], abs=1e-4)


def test_missing_data_dir_names_the_flag(setup):
    from knnlm.errors import KnnlmError
    from knnlm.lm_eval_tasks import utils

    with pytest.raises(KnnlmError, match="data_dir=DIR"):
        utils.load_test()
    with pytest.raises(KnnlmError, match="^--metadata data_dir: nothere holds no Macondo dataset"):  # named --data
        utils.load_test(data_dir="nothere")
    assert len(utils.load_test(data_dir=str(setup[1]))["test"]) == 7


def test_hflm_without_logits_cache_scores_splits_of_one_sequence(setup):
    """Several (context, continuation) splits of one token sequence in one batch: with ``logits_cache=False`` (what
    docs/lm_eval.md advises for such request sets) each log-likelihood is the sum of the augmented model's own
    log p_knnlm over its continuation, from one unbatched forward of the whole sequence."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm, village, ds, _ = setup
    row = read_split(village, "test")[0]
    ids = lm.tokenizer(row["prefix"] + row["target"])["input_ids"]
    splits = list(range(2, len(ids), 2))
    assert len(splits) >= 3
    model = augment(lm, datastore=ds, k=K, lmbda=LMBDA, knn_temp=TEMP)
    try:
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # [T, V]: log p_knnlm again
        want = [float(sum(logp[t - 1, ids[t]] for t in range(s, len(ids)))) for s in splits]
        reqs = [Instance("loglikelihood", {}, (lm.tokenizer.decode(ids[:s]), lm.tokenizer.decode(ids[s:])), i)
                for i, s in enumerate(splits)]
        assert all(lm.tokenizer(r.args[0])["input_ids"] == ids[:s] for r, s in zip(reqs, splits))
        got = [ll for ll, _ in HFLM(pretrained=model, tokenizer=lm.tokenizer, batch_size=4,
                                    logits_cache=False).loglikelihood(reqs, disable_tqdm=True)]
    finally:
        detach(model)
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(w, 3) for w in want}) == len(want)  # the splits score different spans
