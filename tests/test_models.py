"""Model adapter: key points against the model's own logits, f and g identities, PEFT, errors, hashes."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from knnlm.errors import KnnlmError
from knnlm.models import KEY_POINTS, LM, ModelArgs, load_model

ARCH_DIRS = {"gpt2": "tiny_gpt2_dir", "llama": "tiny_llama_dir", "gpt_neox": "tiny_neox_dir"}
TEXTS = ["The quick brown fox jumps over the lazy dog, twice.", "A shorter second line."]


def _batch(lm):
    """Two right-padded sequences: ids [2, T], mask [2, T]."""
    enc = [lm.encode(t) for t in TEXTS]
    T = max(map(len, enc))
    ids = torch.full((2, T), lm.tokenizer.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    return ids, mask


def _load(path, **kw):
    return load_model(ModelArgs(model_name_or_path=str(path), device="cpu", **kw))


@pytest.mark.parametrize("arch", ARCH_DIRS)
def test_key_points_reproduce_the_logits(arch, request):
    path = request.getfixturevalue(ARCH_DIRS[arch])
    lm = _load(path)
    assert lm.model_type == arch and lm.hidden_size == 64 and lm.vocab_size == 50257 and lm.max_positions == 128
    ids, mask = _batch(lm)
    with torch.no_grad():
        logits, keys = lm.forward(ids, mask, KEY_POINTS)
        reference = AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits, -1)
        assert logits.dtype == torch.float32 and logits.shape == (2, ids.shape[1], 50257)
        torch.testing.assert_close(logits, reference)  # an independent load of the same folder
        for p in KEY_POINTS:
            assert keys[p].shape == (2, ids.shape[1], 64), p
        torch.testing.assert_close(lm.f(keys["block_output"]), logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.f(lm.g(keys["ffn_residual"])), logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys["final_hidden"] @ lm.output_layer.weight.T, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.f_logits(keys["block_output"]), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.ffn_norm(keys["ffn_residual"]), keys["ffn_input"])  # ffn_input is after the norm
        # the points are distinct states: g does real work, and the final norm separates block_output and final_hidden
        assert (lm.f(keys["ffn_residual"]) - logp).abs().max() > 1e-3
        assert (keys["block_output"] - keys["final_hidden"]).abs().max() > 1e-2
        # hidden_states gives the same captures without logits: a dict for a sequence, a tensor for one name
        states = lm.hidden_states(ids, mask, ("ffn_input", "block_output"))
        assert set(states) == {"ffn_input", "block_output"}
        torch.testing.assert_close(states["block_output"], keys["block_output"], atol=0, rtol=0)
        torch.testing.assert_close(lm.hidden_states(ids, mask, "ffn_input"), keys["ffn_input"], atol=0, rtol=0)
    for module in (lm._residual_entry, lm._ffn_entry, lm.block, lm._final_exit):  # hooks are removed after each pass
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_f_and_g_carry_gradients(tiny_lm):
    """The gradient through f∘g (what the projection's solver follows) equals central finite differences."""
    torch.manual_seed(0)
    z = torch.randn(3, 64, requires_grad=True)

    def loss(x):
        return tiny_lm.f(tiny_lm.g(x))[:, 7].sum()

    loss(z).backward()
    eps = 1e-2
    for i, j in ((0, 0), (1, 17), (2, 63), (0, 40)):
        step = torch.zeros_like(z)
        step[i, j] = eps
        with torch.no_grad():
            numeric = (loss(z + step) - loss(z - step)) / (2 * eps)
        assert float(z.grad[i, j]) == pytest.approx(float(numeric), rel=2e-2, abs=2e-3)


def test_gpt2_hidden_points_match_hf_hidden_states(tiny_lm):
    ids, mask = _batch(tiny_lm)
    with torch.no_grad():
        _, keys = tiny_lm.forward(ids, mask, ("final_hidden", "block_output"))
        out = tiny_lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(keys["final_hidden"], out.hidden_states[-1])  # GPT-2's last entry is after ln_f
    torch.testing.assert_close(tiny_lm.final(keys["block_output"]), out.hidden_states[-1])


def test_encode_and_special_tokens(tiny_lm, tiny_gpt2_dir):
    assert tiny_lm.encode("Hello world") == [15496, 995]  # GPT-2 adds no BOS
    assert tiny_lm.eos_token_id == 50256 and tiny_lm.tokenizer.pad_token_id == 50256  # missing pad token -> EOS
    assert tiny_lm.name == str(tiny_gpt2_dir)  # the id as given
    assert not tiny_lm.model.training


def test_parallel_residual_neox_refuses_g_but_keeps_f(tiny_gpt2_dir):
    config = GPTNeoXConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=128, use_parallel_residual=True)
    torch.manual_seed(0)
    lm = LM(GPTNeoXForCausalLM(config).eval(), AutoTokenizer.from_pretrained(tiny_gpt2_dir), name="neox-parallel")
    ids = torch.tensor([lm.encode(TEXTS[0])])
    with torch.no_grad():
        logits, keys = lm.forward(ids, None, ("block_output", "ffn_residual"))
        torch.testing.assert_close(lm.f(keys["block_output"]), torch.log_softmax(logits, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(KnnlmError, match="parallel block"):
        lm.g(keys["ffn_residual"])


def test_peft_lora_wrapped_gpt2(tiny_gpt2_dir, tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])).eval()
    lm = LM(peft_model, tiny_lm.tokenizer, name="lora")
    assert lm.model_type == "gpt2"
    ids, mask = _batch(lm)
    with torch.no_grad():
        _, base_keys = tiny_lm.forward(ids, mask, KEY_POINTS)
        _, keys = lm.forward(ids, mask, KEY_POINTS)
        for p in KEY_POINTS:  # LoRA's B starts at zero: the same keys as the base model
            torch.testing.assert_close(keys[p], base_keys[p], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lm.hidden_states(ids, mask, "ffn_input"), base_keys["ffn_input"], atol=1e-6, rtol=1e-6)
        hash_at_init = lm.weights_hash()
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        assert lm.weights_hash() != hash_at_init  # in-place edits invalidate the cached hash
        logits, keys = lm.forward(ids, mask, KEY_POINTS)
        assert (keys["ffn_input"] - base_keys["ffn_input"]).abs().max() > 1e-3  # the adapter is in the forward
        torch.testing.assert_close(lm.hidden_states(ids, mask, "ffn_input"), keys["ffn_input"], atol=0, rtol=0)
        torch.testing.assert_close(lm.f(lm.g(keys["ffn_residual"])), torch.log_softmax(logits, -1),
                                   atol=1e-5, rtol=1e-5)
    # an adapter folder loads through load_model, its tokenizer taken from the base model
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(ModelArgs(model_name_or_path=tmp_path / "adapter", device="cpu"))  # a Path works too
    assert loaded.model_type == "gpt2" and loaded.encode("Hello world") == [15496, 995]
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(ids, mask)[0], logits, atol=1e-5, rtol=1e-5)


def test_unsupported_model_type_is_named(tmp_path, tiny_gpt2_dir):
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=100, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32)
    config.save_pretrained(tmp_path / "gptj")
    with pytest.raises(KnnlmError, match=r"model_type 'gptj'.*supported: gpt2, llama, mistral, qwen2") as e:
        _load(tmp_path / "gptj")
    assert "\n" not in str(e.value) and "falcon" in str(e.value) and "opt" in str(e.value)
    with pytest.raises(KnnlmError, match="model_type 'gptj'"):
        LM(GPTJForCausalLM(config), AutoTokenizer.from_pretrained(tiny_gpt2_dir))


def test_bad_paths_give_one_line_errors(tmp_path):
    cases = [
        (tmp_path / "nope", {}, "does not exist"),
        (tmp_path, {}, "has no config.json"),
        (tmp_path, {"gguf_file": "missing.gguf"}, "--gguf_file: .*missing.gguf does not exist"),
        ("knnlm-test/no-such-model", {}, "cannot load 'knnlm-test/no-such-model'"),  # a hub id, offline
        (tmp_path / "m.gguf", {}, "m.gguf does not exist"),
    ]
    for path, kw, pattern in cases:
        with pytest.raises(KnnlmError, match=pattern) as e:
            _load(path, **kw)
        assert "\n" not in str(e.value) and str(e.value).startswith("--")
    (tmp_path / "w.gguf").write_bytes(b"")
    with pytest.raises(KnnlmError, match="add --gguf_file w.gguf"):
        _load(tmp_path)
    with pytest.raises(KnnlmError, match="--dtype"):
        _load(tmp_path, dtype="float8")
    with pytest.raises(KnnlmError, match="--model_name_or_path: required"):
        load_model(ModelArgs())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(tiny_gpt2_dir):
    with pytest.raises(KnnlmError, match="--device: cuda"):
        load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cuda"))


def test_dtype_bfloat16(tiny_gpt2_dir, tiny_lm):
    lm = _load(tiny_gpt2_dir, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    ids, mask = _batch(lm)
    with torch.no_grad():
        logits, keys = lm.forward(ids, mask, ("block_output",))
        ref = tiny_lm.forward(ids, mask)[0]
    assert logits.dtype == torch.float32 and keys["block_output"].dtype == torch.bfloat16
    assert lm.f(keys["block_output"]).dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=0.1, rtol=0.05)  # bf16 rounding only
    assert lm.weights_hash() != tiny_lm.weights_hash()  # the dtype is part of the weights


def test_hashes_stable_across_loads_and_sensitive_to_weights(tiny_gpt2_dir, tiny_llama_dir, tiny_lm, tmp_path):
    from knnlm.assets import build_scratch_gpt2

    again = _load(tiny_gpt2_dir)
    assert again.weights_hash() == tiny_lm.weights_hash() and again.tokenizer_hash() == tiny_lm.tokenizer_hash()
    assert len(tiny_lm.weights_hash()) == 16 and int(tiny_lm.weights_hash(), 16) >= 0
    other_seed = _load(build_scratch_gpt2("tiny", tmp_path / "seed1", seed=1, n_positions=128))
    assert other_seed.weights_hash() != tiny_lm.weights_hash()
    assert other_seed.tokenizer_hash() == tiny_lm.tokenizer_hash()  # same GPT-2 tokenizer
    # an optimizer step changes the weights in place: the cached hash follows
    before = other_seed.weights_hash()
    opt = torch.optim.SGD(other_seed.model.parameters(), lr=0.1)
    ids, mask = _batch(other_seed)
    other_seed.forward(ids, mask)[0].logsumexp(-1).mean().backward()
    opt.step()
    assert other_seed.weights_hash() != before
    # a different tokenizer (one added token) hashes differently
    llama = _load(tiny_llama_dir)
    llama.tokenizer.add_tokens(["<extra_token>"])
    llama._tokenizer_hash = None
    assert llama.tokenizer_hash() != tiny_lm.tokenizer_hash()


def test_model_args_fields_have_help():
    import dataclasses

    for f in dataclasses.fields(ModelArgs):
        assert f.metadata.get("help"), f.name


def test_tokenizer_hash_is_its_recorded_value_cold_and_memoised(tiny_gpt2_dir, monkeypatch):
    """The GPT-2 tokenizer's hash is the one stores and memories record (they are refused on another); computed from
    scratch or from the per-process memo it is the same, and the memo keeps a changed tokenizer apart."""
    from knnlm import models

    monkeypatch.setattr(models, "_TOKENIZER_HASHES", {})
    cold = _load(tiny_gpt2_dir)
    assert cold.tokenizer_hash() == "ff42658b335a7d88" and len(models._TOKENIZER_HASHES) == 1
    warm = _load(tiny_gpt2_dir)
    assert warm.tokenizer_hash() == "ff42658b335a7d88"
    warm.tokenizer.add_tokens(["<extra_token>"])  # another vocabulary: another serialized form
    warm._tokenizer_hash = None
    added = warm.tokenizer_hash()
    assert added != "ff42658b335a7d88" and len(models._TOKENIZER_HASHES) == 2
    monkeypatch.setattr(models, "_TOKENIZER_HASHES", {})
    warm._tokenizer_hash = None
    assert warm.tokenizer_hash() == added  # the memo gave what a cold computation gives
    other = _load(tiny_gpt2_dir)
    other.tokenizer.eos_token = "<|other|>"  # the same vocabulary, another special token
    other._tokenizer_hash = None
    assert other.tokenizer_hash() not in ("ff42658b335a7d88", added)


def test_auto_device_is_each_processs_own_gpu_under_a_launch(monkeypatch):
    """Under torchrun every rank put its model on cuda:0 (LOCAL_RANK was never read): the GPUs of the other ranks
    idle and the first one's memory multiplied. Checked with torch told it sees a GPU (no GPU here)."""
    from knnlm.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:3") == torch.device("cuda:3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a launcher showing each process its one GPU
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
