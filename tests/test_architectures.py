"""Key capture for every supported decoder family, checked against the last block recomputed by hand.

Each family gets a seeded tiny random config (2 layers, width 32, vocabulary 96). One forward pass runs with the LM's
capture hooks and with the test's own hooks on the last block (its input x and its attention output a); the rest of
the block is then recomputed from the block's own submodules, as the family's modeling code writes it, and every key
point, the logits and the identities f(block_output) = f(g(ffn_residual)) = log_softmax(logits) are compared.
"""
import json

import pytest
import numpy as np
import torch
import transformers as tf

from knnlm.errors import KnnlmError
from knnlm.models import ARCHS, KEY_POINTS, LM

V, D = 96, 32
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)
LLAMA_LIKE = dict(COMMON, intermediate_size=64, num_key_value_heads=2)


# ---- the last block by hand: (block, x [B, T, d], attention output a) -> (ffn_residual, ffn_input, block_output)
def _pre_norm(b, x, a):  # Llama, Qwen, Mistral, Gemma, OLMo, Phi-3, StableLM, sequential Falcon
    r = x + a
    n = b.post_attention_layernorm(r)
    return r, n, r + b.mlp(n)


def _sandwich(b, x, a):  # Gemma2 / Gemma3: norms on both sides of attention and of the MLP
    r = x + b.post_attention_layernorm(a)
    n = b.pre_feedforward_layernorm(r)
    return r, n, r + b.post_feedforward_layernorm(b.mlp(n))


def _olmo2(b, x, a):  # post-norms only: the MLP reads the residual itself
    r = x + b.post_attention_layernorm(a)
    return r, r, r + b.post_feedforward_layernorm(b.mlp(r))


def _opt_pre(b, x, a):
    r = x + a
    n = b.final_layer_norm(r)
    return r, n, r + b.fc2(b.activation_fn(b.fc1(n)))


def _opt_post(b, x, a):  # OPT-350m: post-LN, the block ends with final_layer_norm
    r = b.self_attn_layer_norm(x + a)
    return r, r, b.final_layer_norm(r + b.fc2(b.activation_fn(b.fc1(r))))


def _parallel(norm):  # Phi, Falcon (7B/40B layouts): attention and MLP both read the block input x
    def run(b, x, a):
        n = getattr(b, norm)(x)
        return x, n, x + a + b.mlp(n)
    return run


def _final(*paths):
    """block_output -> logits through the model's own final modules (absent ones skipped) and lm_head."""
    def run(m, h):
        for p in paths:
            mod = m
            for name in p.split("."):
                mod = getattr(mod, name, None)
            h = mod(h) if mod is not None else h
        return m.lm_head(h)
    return run


def _capped(final, cap):
    return lambda m, h: torch.tanh(final(m, h) / cap) * cap


NORM = _final("model.norm")
FAMILIES = {  # name: (model class, config, attention attribute, block by hand, head by hand)
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**LLAMA_LIKE), "self_attn", _pre_norm, NORM),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**LLAMA_LIKE, head_dim=8), "self_attn", _pre_norm, NORM),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**LLAMA_LIKE), "self_attn", _pre_norm, NORM),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**LLAMA_LIKE, head_dim=8), "self_attn", _pre_norm, NORM),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**LLAMA_LIKE, head_dim=8, final_logit_softcapping=0.2),
               "self_attn", _sandwich, _capped(NORM, 0.2)),  # a small cap, so that soft-capping shows
    "gemma3_text": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, sliding_window=4),
                    "self_attn", _sandwich, NORM),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**LLAMA_LIKE), "self_attn", _pre_norm, NORM),
    "olmo": (tf.OlmoForCausalLM, tf.OlmoConfig(**LLAMA_LIKE), "self_attn", _pre_norm, NORM),
    "olmo2": (tf.Olmo2ForCausalLM, tf.Olmo2Config(**LLAMA_LIKE), "self_attn", _olmo2, NORM),
    "olmo3": (tf.Olmo3ForCausalLM, tf.Olmo3Config(**LLAMA_LIKE, sliding_window=4), "self_attn", _olmo2, NORM),
    "stablelm": (tf.StableLmForCausalLM, tf.StableLmConfig(**LLAMA_LIKE), "self_attn", _pre_norm, NORM),
    "phi": (tf.PhiForCausalLM, tf.PhiConfig(**LLAMA_LIKE), "self_attn", _parallel("input_layernorm"),
            _final("model.final_layernorm")),
    "opt": (tf.OPTForCausalLM, tf.OPTConfig(**COMMON, ffn_dim=64, word_embed_proj_dim=D), "self_attn", _opt_pre,
            _final("model.decoder.final_layer_norm")),
    "opt-350m-layout": (tf.OPTForCausalLM, tf.OPTConfig(**COMMON, ffn_dim=64, word_embed_proj_dim=16,
                                                        do_layer_norm_before=False),
                        "self_attn", _opt_post, _final("model.decoder.project_out")),
    "falcon-40b-layout": (tf.FalconForCausalLM, tf.FalconConfig(**COMMON, new_decoder_architecture=True, num_kv_heads=2),
                          "self_attention", _parallel("ln_mlp"), _final("transformer.ln_f")),
    "falcon-7b-layout": (tf.FalconForCausalLM, tf.FalconConfig(**COMMON, multi_query=True, parallel_attn=True),
                         "self_attention", _parallel("input_layernorm"), _final("transformer.ln_f")),
    "falcon-rw-layout": (tf.FalconForCausalLM, tf.FalconConfig(**COMMON, parallel_attn=False, alibi=True),
                         "self_attention", _pre_norm, _final("transformer.ln_f")),
}
PARALLEL = {"phi", "falcon-40b-layout", "falcon-7b-layout"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from knnlm.assets import gpt2_tokenizer_dir

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())  # only its pad/EOS are read: inputs are raw ids


def _inputs():
    """Two right-padded rows of ids in [3, V): ids [2, 12], mask [2, 12]."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@pytest.mark.parametrize("family", FAMILIES)
def test_key_points_equal_the_last_block_by_hand(family, tokenizer):
    model_cls, config, attn_name, by_hand, head = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config).eval()
    lm = LM(model, tokenizer, name=family)
    assert lm.model_type == config.model_type and lm.hidden_size == D and lm.vocab_size == V
    ids, mask = _inputs()
    seen = {}
    block = lm.block
    hooks = [block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", _first(a, k).clone()),
                                             with_kwargs=True),
             getattr(block, attn_name).register_forward_hook(lambda m, a, out: seen.__setitem__("a", out[0].clone()))]
    with torch.no_grad():
        logits, keys = lm.forward(ids, mask, KEY_POINTS)
        for h in hooks:
            h.remove()
        reference = model(input_ids=ids, attention_mask=mask).logits  # a plain pass, no hooks at all
        residual, ffn_in, out = by_hand(block, seen["x"], seen["a"])
        expected = {"ffn_residual": residual, "ffn_input": ffn_in, "block_output": out}
        hand_logits = head(model, out)
        logp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(logits, reference, atol=0, rtol=0)
        torch.testing.assert_close(hand_logits, logits, atol=1e-5, rtol=1e-5)  # the hand-written block is right
        for p, want in expected.items():
            assert keys[p].shape == (2, 12, D), p
            torch.testing.assert_close(keys[p], want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{family} {p}: {m}")
        torch.testing.assert_close(lm.output_layer(keys["final_hidden"]), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.f(keys["block_output"]), logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.ffn_norm(keys["ffn_residual"]), keys["ffn_input"], atol=1e-6, rtol=1e-6)
        assert (keys["block_output"] - keys["ffn_residual"]).abs().max() > 1e-3  # distinct states
        if family in PARALLEL:
            with pytest.raises(KnnlmError, match="parallel block") as e:
                lm.g(keys["ffn_residual"])
            assert "\n" not in str(e.value) and family.split("-")[0] in str(e.value)
        else:
            torch.testing.assert_close(lm.f(lm.g(keys["ffn_residual"])), logp, atol=1e-5, rtol=1e-5)
        # hidden_states (no logits; logits_to_keep=1) captures the same tensors
        states = lm.hidden_states(ids, mask, KEY_POINTS)
        for p in KEY_POINTS:
            torch.testing.assert_close(states[p], keys[p], atol=0, rtol=0)
    for module in (lm._residual_entry, lm._ffn_entry, lm.block, lm._final_exit):  # hooks are removed
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_softcap_and_project_out_are_part_of_the_head(tokenizer):
    """Gemma2's cap bounds the logits; OPT-350m's project_out makes final_hidden narrower than d."""
    torch.manual_seed(0)
    gemma2 = LM(FAMILIES["gemma2"][0](FAMILIES["gemma2"][1]).eval(), tokenizer)
    opt = LM(FAMILIES["opt-350m-layout"][0](FAMILIES["opt-350m-layout"][1]).eval(), tokenizer)
    ids, mask = _inputs()
    with torch.no_grad():
        logits, keys = gemma2.forward(ids, mask, ("final_hidden",))
        raw = keys["final_hidden"] @ gemma2.output_layer.weight.T
        assert logits.abs().max() < 0.2 < raw.abs().max()  # the cap acts, and output_layer applies it
        assert gemma2.output_layer.out_features == V and gemma2.output_layer.bias is None
        _, keys = opt.forward(ids, mask, KEY_POINTS)
    assert keys["final_hidden"].shape == (2, 12, 16) and keys["block_output"].shape == (2, 12, D)


def test_mlp_memory_activation_is_the_familys_own(tokenizer):
    from knnlm.memory import lm_activation

    want = {"qwen2": "silu", "gemma": "gelu_pytorch_tanh", "gemma2": "gelu_pytorch_tanh", "opt": "relu",
            "falcon-40b-layout": "gelu", "phi": "gelu_new"}
    for family, name in want.items():
        model_cls, config, *_ = FAMILIES[family]
        torch.manual_seed(0)
        assert lm_activation(LM(model_cls(config), tokenizer)) == name, family


def test_mlp_memory_needs_keys_as_wide_as_the_output_layer(tokenizer, wikitext_dir, tmp_path):
    """OPT-350m's project_out makes W 16 wide: a memory over d=32 ffn_input keys is refused with a one-line error."""
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import build_datastore
    from knnlm.memory import MemoryArgs, train_memory

    config = tf.OPTConfig(**dict(COMMON, vocab_size=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=1),
                          ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False)
    torch.manual_seed(0)
    lm = LM(tf.OPTForCausalLM(config).eval(), tokenizer, name="opt-350m-layout")
    (tmp_path / "train.txt").write_text((wikitext_dir / "valid.txt").read_text()[:1500])
    ds = build_datastore(lm, CorpusArgs(train_file=str(tmp_path / "train.txt"), block_size=32, stride=16),
                         tmp_path / "ds")
    assert ds.d == D and ds.key_point == "ffn_input"
    args = MemoryArgs(datastore=str(ds.dir), output_dir=str(tmp_path / "mlp"), hidden_size=8, max_steps=1)
    with pytest.raises(KnnlmError, match="16-wide inputs .*use kNN retrieval") as e:
        train_memory(lm, ds, args)
    assert "\n" not in str(e.value)
    # a final_hidden store has the output layer's width (16), and its first key is the captured one
    ds16 = build_datastore(lm, CorpusArgs(train_file=str(tmp_path / "train.txt"), block_size=32, stride=16),
                           tmp_path / "ds16", key_point="final_hidden")
    assert ds16.d == 16 and ds16.keys.shape == (ds16.N, 16)
    from knnlm.corpus import TokenFile

    tokens = TokenFile(ds16.dir / "tokens.i32", ds16.dir / "tokens.i32.docs").tokens
    ids = torch.from_numpy(np.asarray(tokens[:32], dtype=np.int64))[None]  # the first window, [1, 32]
    with torch.no_grad():
        h = lm.hidden_states(ids, torch.ones_like(ids), ("final_hidden",))["final_hidden"][0, 0]  # [16]
    torch.testing.assert_close(torch.from_numpy(np.asarray(ds16.keys[0], dtype=np.float32)), h.float(),
                               atol=1e-2, rtol=1e-2)


def test_every_table_entry_is_tested():
    tested = {c.model_type for _, c, *_ in FAMILIES.values()} | {"gpt2", "llama", "gpt_neox"}  # + test_models.py
    assert tested == set(ARCHS)


def test_datastore_and_eval_through_the_real_loaders(tmp_path, wikitext_dir):
    """A Qwen2 saved with save_pretrained and loaded by path: datastore build, then knnlm eval with kNN."""
    from conftest import save_tiny

    from knnlm.cli import main

    config = tf.Qwen2Config(**dict(LLAMA_LIKE, vocab_size=50257, bos_token_id=50256, eos_token_id=50256,
                                   pad_token_id=None))
    model_dir = save_tiny(tf.Qwen2ForCausalLM, config, tmp_path / "qwen2", seed=3)
    text = (wikitext_dir / "valid.txt").read_text()[:3000]
    (tmp_path / "train.txt").write_text(text[:2000])
    (tmp_path / "valid.txt").write_text(text[2000:])
    common = ["--model_name_or_path", str(model_dir), "--device", "cpu", "--block_size", "64", "--stride", "32"]
    assert main(["datastore", "build", *common, "--train_file", str(tmp_path / "train.txt"),
                 "--output_dir", str(tmp_path / "ds")]) == 0
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["d"] == D and meta["key_point"] == "ffn_input" and meta["N"] > 300
    assert main(["eval", *common, "--validation_file", str(tmp_path / "valid.txt"), "--datastore",
                 str(tmp_path / "ds"), "--k", "16", "--lmbda", "0.25,0", "--output_dir", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    # a random model is near-uniform over 50257 tokens; the store (1 run of 2000 chars) must change the perplexity
    assert 2e4 < m["ppl_lm"] < 2e5 and m["ppl_knnlm"] != m["ppl_lm"] and m["n_tokens"] > 200
    # ppl_lm is the saved model's own perplexity, recomputed through plain transformers over the eval's windows
    from conftest import window_gold_log_probs
    from knnlm.corpus import TokenFile

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = TokenFile(tmp_path / "out" / "tokens.i32", tmp_path / "out" / "tokens.i32.docs")
    gold, logp = window_gold_log_probs(hf, tokens, 64, 32)
    n = len(gold)
    assert n == m["n_tokens"] and m["ppl_lm"] == pytest.approx(np.exp(-float(logp.sum()) / n), rel=1e-5)
    assert m["sweep_knn"]["0.0"] == m["ppl_lm"] and m["sweep_knn"]["0.25"] == m["ppl_knnlm"]  # λ 0: the LM exactly
