"""The kNN-LM as a drop-in HF model (knnlm.augmented): perplexity equals `knnlm eval`, generate with a KV cache equals
a no-cache recomputation with one retrieval per new position, pipeline, beam search, detach, refusals."""
import json
import math

import pytest
import torch

from conftest import empty_list_ivf, window_gold_log_probs
from knnlm.augmented import augment, detach
from knnlm.cli import main
from knnlm.corpus import CorpusArgs, TokenFile, windows
from knnlm.datastore import build_datastore
from knnlm.errors import KnnlmError
from knnlm.knn import KNNArgs, Retriever, interpolate
from knnlm.memory import MLPMemory
from knnlm.models import ModelArgs, load_model

TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together on a mat.\n" * 3
VALID = "the dog sat on the mat. a cat sat on the log. the cat and the dog.\n" * 2
K, LMBDA, TEMP = 8, 0.3, 2.0


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    """A private copy of the tiny GPT-2 (the hooks must not leak into the session's tiny_lm)."""
    return load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("aug")
    (d / "train.txt").write_text(TRAIN)
    (d / "valid.txt").write_text(VALID)
    return d


@pytest.fixture(scope="module")
def store(lm, files):
    return build_datastore(lm, CorpusArgs(train_file=str(files / "train.txt"), block_size=64, stride=32),
                           files / "ds", batch_size=4)


@pytest.fixture()
def knn_model(lm, store):
    model = augment(lm, datastore=store, k=K, lmbda=LMBDA, knn_temp=TEMP)
    yield model
    detach(model)


def _ppl_through_model(model, tokens: TokenFile, block: int, stride: int) -> tuple[float, int]:
    """Perplexity over the windows of `knnlm eval`, each window one forward of ``model`` (logits = log-probs)."""
    gold, logp = window_gold_log_probs(model, tokens, block, stride)
    return math.exp(-float(logp.sum()) / len(gold)), len(gold)


def test_perplexity_equals_knnlm_eval(lm, store, files, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model_name_or_path", str(tiny_gpt2_dir), "--device", "cpu", "--validation_file",
                 str(files / "valid.txt"), "--block_size", "16", "--stride", "8", "--datastore", str(store.dir),
                 "--k", str(K), "--lmbda", str(LMBDA), "--knn_temp", str(TEMP), "--output_dir", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    tokens = TokenFile(out / "tokens.i32", out / "tokens.i32.docs")
    model = augment(lm, datastore=store, k=K, lmbda=LMBDA, knn_temp=TEMP)
    try:
        ppl, n = _ppl_through_model(model, tokens, 16, 8)
        assert model.knnlm.n_queries == sum(w.end - w.start for w in windows(tokens.doc_starts, 16, 8))
    finally:
        detach(model)
    assert n == m["n_tokens"] == len(lm.encode(VALID)) - 1
    assert ppl == pytest.approx(m["ppl_knnlm"], rel=1e-5)
    assert m["ppl_knnlm"] != pytest.approx(m["ppl_lm"], rel=1e-3)  # the store changes the numbers
    plain, _ = _ppl_through_model(lm.model, tokens, 16, 8)
    assert plain == pytest.approx(m["ppl_lm"], rel=1e-5)


def test_mlp_memory_perplexity_equals_evaluate(lm, files, tmp_path):
    from knnlm.evaluate import EvalArgs, evaluate

    torch.manual_seed(0)
    mem = MLPMemory(lm.hidden_size, 32, lm.vocab_size, output_layer=lm.output_layer,
                    reference={"key_point": "ffn_input"}).eval()
    corpus = CorpusArgs(validation_file=str(files / "valid.txt"), block_size=16, stride=8)
    m = evaluate(lm, corpus, tmp_path, EvalArgs(output_dir=str(tmp_path)), memory=mem, knn=KNNArgs(lmbda=[0.4]))
    model = augment(lm, mlp_memory=mem, lmbda=0.4)
    try:
        ppl, _ = _ppl_through_model(model, TokenFile(tmp_path / "tokens.i32", tmp_path / "tokens.i32.docs"), 16, 8)
    finally:
        detach(model)
    assert ppl == pytest.approx(m["ppl_mlplm"], rel=1e-5)
    for setting in (dict(k=5), dict(retomaton=True)):  # read only by retrieval: refused as the CLI refuses them
        with pytest.raises(KnnlmError, match=f"--{next(iter(setting))}: a kNN setting, which acts only with --datastore"):
            augment(lm, mlp_memory=mem, lmbda=0.4, **setting)
    assert not hasattr(lm.model, "knnlm")


def _augmented_logp(lm, retriever, ids: list[int]) -> torch.Tensor:
    """log p_knnlm at the last position of ``ids``, recomputed from scratch (no cache, no hooks): [V] float32."""
    assert not hasattr(lm.model, "knnlm")
    logits, caps = lm.forward(torch.tensor([ids]), key_points="ffn_input")
    lm_logp = torch.log_softmax(logits[0, -1], dim=-1)[None]  # [1, V]
    return interpolate(lm_logp, retriever.log_probs(caps["ffn_input"][0, -1:], lm.vocab_size), LMBDA)[0]


def test_generate_with_kv_cache_equals_recomputation(lm, store):
    retriever = Retriever(store, KNNArgs(k=K, knn_temp=TEMP))
    prompt = lm.encode("the cat sat")
    seq, want_scores = list(prompt), []
    for _ in range(6):  # greedy chain without cache
        logp = _augmented_logp(lm, retriever, seq)
        want_scores.append(logp)
        seq.append(int(torch.argmax(logp)))
    knn_model = augment(lm, datastore=store, k=K, lmbda=LMBDA, knn_temp=TEMP)
    assert knn_model is lm.model  # augmented in place
    out = knn_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_cache=True,
                             pad_token_id=lm.eos_token_id, output_logits=True, return_dict_in_generate=True)
    assert out.sequences[0].tolist() == seq
    assert knn_model.knnlm.n_queries == 6  # one retrieval per new position: the prompt's are not queried
    for got, want in zip(out.logits, want_scores):  # the raw logits are log p_knnlm
        assert torch.allclose(got[0], want, atol=1e-5)
    # the store changes the continuation of the plain model
    detach(knn_model)
    plain_seq = lm.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=lm.eos_token_id)[0].tolist()
    assert plain_seq != seq


def test_beam_search_sampling_and_pipeline(lm, store, knn_model):
    from transformers import pipeline

    prompt = torch.tensor([lm.encode("a dog")])
    knn_model.knnlm.n_queries = 0
    out = knn_model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=lm.eos_token_id,
                             early_stopping=False, length_penalty=0.0, output_scores=True,
                             return_dict_in_generate=True)
    beams = out.sequences
    assert knn_model.knnlm.n_queries == 4 * 3  # beams x new positions
    greedy = knn_model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=lm.eos_token_id)
    assert beams.shape == greedy.shape == (1, prompt.shape[1] + 4)
    sample = [knn_model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                                 pad_token_id=lm.eos_token_id, generator=None) for _ in range(1)]
    torch.manual_seed(11)
    a = knn_model.generate(prompt, max_new_tokens=5, do_sample=True, temperature=0.8, pad_token_id=lm.eos_token_id)
    torch.manual_seed(11)
    b = knn_model.generate(prompt, max_new_tokens=5, do_sample=True, temperature=0.8, pad_token_id=lm.eos_token_id)
    assert torch.equal(a, b) and sample[0].shape[1] == prompt.shape[1] + 5
    pipe = pipeline("text-generation", model=knn_model, tokenizer=lm.tokenizer)
    text = pipe("a dog", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text == lm.tokenizer.decode(greedy[0])
    # sampling (no top-k / top-p cut) draws from softmax(log p_knnlm / T): the same seed replayed by hand with
    # torch.multinomial over the recomputed kNN-LM gives the same tokens (and over the plain LM other ones)
    torch.manual_seed(5)
    sampled = knn_model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0, temperature=0.8,
                                 pad_token_id=lm.eos_token_id)[0].tolist()
    detach(knn_model)  # the references are computed without the hooks
    retriever = Retriever(store, KNNArgs(k=K, knn_temp=TEMP))

    @torch.no_grad()
    def knn_logp(ids):
        return _augmented_logp(lm, retriever, ids)  # [V]

    @torch.no_grad()
    def plain_logp(ids):
        return torch.log_softmax(lm.forward(torch.tensor([ids]))[0][0, -1], dim=-1)  # [V]

    def replay(logp_of, seed):
        torch.manual_seed(seed)
        seq = prompt[0].tolist()
        for _ in range(5):
            probs = torch.softmax(logp_of(seq) / 0.8, dim=-1)
            seq.append(int(torch.multinomial(probs[None], num_samples=1)[0, 0]))
        return seq

    assert sampled == replay(knn_logp, 5)
    assert sampled != replay(plain_logp, 5)
    # beam search ranks by the sum of log p_knnlm (length_penalty 0: no length normalisation)
    seq = beams[0].tolist()
    n0 = prompt.shape[1]
    knn_sum = sum(float(knn_logp(seq[:i])[seq[i]]) for i in range(n0, len(seq)))
    lm_sum = sum(float(plain_logp(seq[:i])[seq[i]]) for i in range(n0, len(seq)))
    assert float(out.sequences_scores[0]) == pytest.approx(knn_sum, abs=1e-4)
    assert abs(knn_sum - lm_sum) > 1e-2


def test_padding_is_not_queried_and_rows_match(lm, knn_model):
    lm.tokenizer.padding_side = "right"  # GPT-2's absolute positions: left padding would shift them
    batch = lm.tokenizer(["the cat sat on", "a dog"], return_tensors="pt", padding=True)
    knn_model.knnlm.n_queries = 0
    with torch.no_grad():
        logits = knn_model(**batch).logits  # [2, T, V]
    assert knn_model.knnlm.n_queries == int(batch["attention_mask"].sum())
    alone = knn_model(input_ids=torch.tensor([lm.encode("a dog")])).logits[0]  # [2, V]
    assert torch.allclose(logits[1, :2], alone, atol=1e-4)


def test_lambda0_detach_and_loss(lm, store):
    ids = torch.tensor([lm.encode("the cat sat on the mat")])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits.clone()
        model = augment(lm, datastore=store, k=K, lmbda=0.0)
        zero = model(input_ids=ids).logits
        detach(model)
        model = augment(lm, datastore=store, k=K, lmbda=0.5)
        out = model(input_ids=ids, labels=ids)
        logp = out.logits
        want = -logp[0, :-1].gather(1, ids[0, 1:, None]).mean()
        assert float(out.loss) == pytest.approx(float(want), rel=1e-6)
        assert torch.allclose(logp.exp().sum(-1), torch.ones(1, ids.shape[1]), atol=1e-5)
        loss_t, logits_t = model(input_ids=ids, labels=ids, return_dict=False)[:2]  # the tuple form
        assert torch.equal(logits_t, logp) and float(loss_t) == pytest.approx(float(out.loss), rel=1e-6)
        assert model.knnlm.detach() is lm.model and not hasattr(lm.model, "knnlm")
        again = lm.model(input_ids=ids).logits
    assert torch.equal(zero, torch.log_softmax(plain, dim=-1))  # λ = 0: the LM's distribution exactly
    assert torch.equal(again, plain)  # detached: bit-for-bit the plain model
    assert detach(lm.model) is lm.model  # detaching a plain model is a no-op


def test_refusals(lm, store, files, tiny_llama_dir, tmp_path):
    for kwargs, match in [(dict(k=0), "--k"), (dict(lmbda=1.5), "--lmbda"), (dict(knn_temp=0.0), "--knn_temp"),
                          (dict(lmbda=[0.1, 0.2]), "one λ"), (dict(key_point="final_hidden"), "--key_point")]:
        with pytest.raises(KnnlmError, match=match):
            augment(lm, datastore=store, **kwargs)
    with pytest.raises(KnnlmError, match="exactly one"):
        augment(lm)
    with pytest.raises(KnnlmError, match="tokenizer"):
        augment(lm.model, datastore=store)
    other = load_model(ModelArgs(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    with pytest.raises(KnnlmError, match="different model weights"):
        augment(other, datastore=store)
    with pytest.raises(KnnlmError, match="does not exist"):
        augment(lm, datastore=tmp_path / "nothing")
    model = augment(lm.model, lm.tokenizer, datastore=str(store.dir), k=K)  # an HF model + tokenizer works too
    try:
        with pytest.raises(KnnlmError, match="augmented already"):
            augment(lm, datastore=store)
    finally:
        detach(model)
    assert not hasattr(lm.model, "knnlm")


def test_cli_generate_compare_writes_results(lm, store, tiny_gpt2_dir, tmp_path, capsys):
    prompts = ["the cat", "a dog sat"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompts[1]}) + "\n")
    out = tmp_path / "gen"
    assert main(["generate", "--model_name_or_path", str(tiny_gpt2_dir), "--device", "cpu", "--datastore",
                 str(store.dir), "--k", str(K), "--lmbda", str(LMBDA), "--knn_temp", str(TEMP), "--prompt", prompts[0],
                 "--prompt_file", str(tmp_path / "p.jsonl"), "--max_new_tokens", "6", "--compare", "true",
                 "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    samples = res["metrics"]["samples"]
    assert [s["prompt"] for s in samples] == prompts and res["metrics"]["augmentation"]["k"] == K
    for s in samples:
        ids = torch.tensor([lm.encode(s["prompt"])])
        plain = lm.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=lm.eos_token_id)[0, ids.shape[1]:]
        model = augment(lm, datastore=store, k=K, lmbda=LMBDA, knn_temp=TEMP)
        try:
            knn = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=lm.eos_token_id)[0, ids.shape[1]:]
        finally:
            detach(model)
        assert s["lm"] == lm.tokenizer.decode(plain) and s["augmented"] == lm.tokenizer.decode(knn)
        assert f"  kNN-LM : {s['augmented']}" in printed and f"  LM     : {s['lm']}" in printed
    assert (out / "results.md").read_text().count("\n") == 4


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "x", "--num_beams", "0"], "--num_beams"),
    (["--prompt", "x", "--top_p", "0"], "--top_p"),
    (["--prompt", "x", "--temperature", "0.5"], "--temperature: a sampling setting, which acts only with --do_sample"),
    (["--prompt", "x", "--top_k", "3", "--num_beams", "2"], "--top_k: a sampling setting"),  # was ignored
    (["--prompt", "x", "--lmbda", "0.1,0.2"], "one λ"),
    (["--prompt_file", "/nonexistent.txt"], "--prompt_file"),
    (["--prompt", "x", "--max_new_tokens", "500"], "exceeds the model's 128 positions"),
])
def test_cli_generate_bad_input(store, tiny_gpt2_dir, argv, needle, capsys):
    code = main(["generate", "--model_name_or_path", str(tiny_gpt2_dir), "--device", "cpu", "--datastore",
                 str(store.dir), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("knnlm: error: ") and needle in err and "\n" not in err


def test_package_level_names():
    import knnlm
    import knnlm.augmented

    assert knnlm.augment is knnlm.augmented.augment and knnlm.detach is knnlm.augmented.detach


@pytest.mark.parametrize("retomaton", [False, True])
def test_opt_whose_ffn_runs_on_flattened_rows_is_augmented(files, tmp_path, retomaton):
    """OPT captures ffn_input as [B*T, d]: the augmentation sliced its feature axis (an IndexError on every call)."""
    import transformers as tf
    from transformers import AutoTokenizer

    from knnlm.assets import gpt2_tokenizer_dir

    torch.manual_seed(0)
    config = tf.OPTConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                          word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=50256,
                          eos_token_id=50256, pad_token_id=50256)
    tf.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    AutoTokenizer.from_pretrained(gpt2_tokenizer_dir()).save_pretrained(tmp_path / "opt")
    opt = load_model(ModelArgs(model_name_or_path=str(tmp_path / "opt"), device="cpu"))
    ds = build_datastore(opt, CorpusArgs(train_file=str(files / "train.txt"), block_size=64), tmp_path / "ds")
    assert ds.key_point == "ffn_input"
    ids = torch.tensor([opt.encode("the cat sat on the mat. the dog")] * 2)  # [2, T]
    with torch.no_grad():
        logits, caps = opt.forward(ids, None, ("ffn_input",))  # caps [2, T, d] (models.py unflattens)
    settings = dict(k=K, lmbda=LMBDA, knn_temp=TEMP, **({"retomaton": True, "no_pointer": True} if retomaton else {}))
    retriever = Retriever(ds, KNNArgs(**{**settings, "lmbda": [LMBDA], "recompute_dists": True}))
    want = interpolate(torch.log_softmax(logits, -1).flatten(0, 1),
                       retriever.log_probs(caps["ffn_input"].flatten(0, 1), logits.shape[-1]), LMBDA)  # [2T, V]
    model = augment(opt, datastore=ds, recompute_dists=True, **settings)
    try:
        with torch.no_grad():
            got = model(ids).logits  # [2, T, V]
        torch.testing.assert_close(got.flatten(0, 1), want, atol=1e-5, rtol=1e-5)
        out = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3, do_sample=False,
                             pad_token_id=50256)
        assert out.shape == (1, ids.shape[1] + 3)
    finally:
        detach(model)


def test_generation_ignores_the_checkpoints_sampling_extras(tiny_gpt2_dir, tmp_path):
    """A checkpoint's generation_config.json (a repetition penalty, n-gram blocking, sampling on) acted in `knnlm
    generate`'s greedy decoding, while `knnlm serve` set them neutral: both now decode the argmax."""
    import shutil

    from transformers import GenerationConfig

    from knnlm.augmented import GenerateArgs, generate_continuations
    from knnlm.serve import CompletionEngine

    shutil.copytree(tiny_gpt2_dir, tmp_path / "m")
    prompt = "the cat sat on the mat. the cat sat on the"
    plain = load_model(ModelArgs(model_name_or_path=str(tmp_path / "m"), device="cpu"))
    with torch.no_grad():
        first = int(plain.model(torch.tensor([plain.encode(prompt)])).logits[0, -1].argmax())
    # what the neutral list missed (before: suppress_tokens and min_p still acted): every field unset in the config
    # knnlm passes was taken from the checkpoint's
    GenerationConfig(do_sample=True, temperature=0.3, top_k=3, repetition_penalty=3.0, no_repeat_ngram_size=2,
                     suppress_tokens=[first], min_p=0.99, bad_words_ids=[[first]], min_new_tokens=20,
                     bos_token_id=50256, eos_token_id=50256).save_pretrained(tmp_path / "m")
    model = load_model(ModelArgs(model_name_or_path=str(tmp_path / "m"), device="cpu"))
    ids = model.encode(prompt)
    with torch.no_grad():
        for _ in range(12):  # greedy by hand: the argmax of the model's own logits
            ids.append(int(model.model(torch.tensor([ids])).logits[0, -1].argmax()))
    want = model.tokenizer.decode(ids[len(model.encode(prompt)):], clean_up_tokenization_spaces=False)
    assert generate_continuations(model, [prompt], GenerateArgs(max_new_tokens=12))[0]["text"] == want
    served = CompletionEngine(model, name="m").complete({"prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert served["choices"][0]["text"] == want
    assert model.model.generation_config.suppress_tokens == [first]  # the model's own is back after generating


def test_positions_whose_search_finds_no_neighbour_keep_the_lm(lm, store, files, tmp_path):
    """An IVF index whose probed list is empty returns no neighbour (ids -1, distances inf): p_knn is undefined there.
    `knnlm eval` scored the LM at such positions, while the augmented model gave NaN logits and the --from_neighbors
    sweep a NaN perplexity."""
    from knnlm.evaluate import EvalArgs, evaluate, sweep_from_cache

    ivf = empty_list_ivf(store)
    corpus = CorpusArgs(validation_file=str(files / "valid.txt"), block_size=16, stride=8)
    m = evaluate(lm, corpus, tmp_path / "ev", EvalArgs(output_dir=str(tmp_path / "ev"), save_neighbors=True),
                 datastore=store, knn=KNNArgs(k=K, lmbda=[LMBDA], knn_temp=TEMP), index=ivf)
    assert m["ppl_knnlm"] == pytest.approx(m["ppl_lm"], rel=1e-6)  # every position without neighbours: the LM
    swept = sweep_from_cache(tmp_path / "ev" / "neighbors", [LMBDA, 1.0], [TEMP])
    assert all(v == pytest.approx(m["ppl_lm"], rel=1e-6) for v in swept.values()), swept
    ids = torch.tensor([lm.encode(VALID)[:12]])
    with torch.no_grad():
        plain = torch.log_softmax(lm.model(ids).logits.float(), dim=-1)
    model = augment(lm, datastore=store, index=ivf, k=K, lmbda=LMBDA, knn_temp=TEMP)
    try:
        with torch.no_grad():
            got = model(ids).logits
    finally:
        detach(model)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-6)


def test_generation_stops_at_every_end_token_of_the_checkpoint(tiny_gpt2_dir, tmp_path):
    """A checkpoint listing several end tokens (Qwen3's generation_config.json: <|im_end|> and <|endoftext|>) stopped
    only at the tokenizer's EOS, in `knnlm generate` and in `knnlm serve`: here a later token of greedy's continuation
    is made an end token, so both stop at its first occurrence (finish_reason "stop"); without the list they run to
    max_new_tokens."""
    import shutil

    from transformers import GenerationConfig

    from knnlm.augmented import GenerateArgs, generate_continuations
    from knnlm.serve import CompletionEngine

    shutil.copytree(tiny_gpt2_dir, tmp_path / "m")
    prompt = "the cat sat on the mat. the cat sat on the"
    plain = load_model(ModelArgs(model_name_or_path=str(tmp_path / "m"), device="cpu"))
    ids = plain.encode(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(plain.model(torch.tensor([ids])).logits[0, -1].argmax()))
    gen = ids[-8:]
    n = next(j for j in range(1, 8) if gen[j] not in gen[:j]) + 1  # greedy stops after its n-th token
    end = gen[n - 1]
    assert end != plain.eos_token_id
    full = generate_continuations(plain, [prompt], GenerateArgs(max_new_tokens=8))[0]
    assert full["n_tokens"] == 8
    GenerationConfig(eos_token_id=[plain.eos_token_id, end]).save_pretrained(tmp_path / "m")
    model = load_model(ModelArgs(model_name_or_path=str(tmp_path / "m"), device="cpu"))
    assert model.stop_token_ids == (plain.eos_token_id, end) and model.eos_token_id == plain.eos_token_id
    got = generate_continuations(model, [prompt], GenerateArgs(max_new_tokens=8))[0]
    assert got["n_tokens"] == n
    assert got["text"] == plain.tokenizer.decode(gen[:n], clean_up_tokenization_spaces=False)
    served = CompletionEngine(model, name="m").complete({"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert served["choices"][0]["finish_reason"] == "stop" and served["usage"]["completion_tokens"] == n
    assert served["choices"][0]["text"] == got["text"]


@pytest.mark.parametrize("name, body", [("p.txt", "Once upon a time\nThe cat\n"),
                                        ("p.jsonl", '{"prompt": "Once upon a time"}\n{"prompt": "The cat"}\n')])
def test_a_prompt_file_opening_with_a_bom_reads_as_without_it(tmp_path, name, body):
    """A UTF-8 BOM (a Windows editor's) opened the first .txt prompt as text, and made a .jsonl file's first row "not
    valid JSON": a corpus file drops it (corpus.BOM), and so does --prompt_file."""
    from knnlm.augmented import read_prompts

    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_prompts(None, str(path)) == (["Once upon a time", "The cat"], 0)
