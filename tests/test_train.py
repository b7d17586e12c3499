"""The shared training loop (resume, eval points, PEFT) and the from-scratch LM recipe (tokenizer, perplexity, saved folder)."""
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from knnlm.errors import KnnlmError
from knnlm.experiments.lm.data import BlockBatches, perplexity, train_bpe_tokenizer
from knnlm.train import TrainArgs, collate_causal, train

torch.set_num_threads(1)

TEXT = ("The cat sat on the mat. The dog sat on the log. Naïve café owners said \"héllo\" — 戦場のヴァルキュリア 3!\n"
        " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese ) , 1 @,@ 000 units .\n") * 6


def tiny_model(seed: int = 0, vocab: int = 48, dropout: float = 0.1) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def sentences(n: int = 10, vocab: int = 48) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(1, vocab, size=int(rng.integers(5, 14))).tolist() for _ in range(n)]


def sentence_batches(seqs, batch_size=2, on_yield=None):
    """batches(epoch, seed): the sentences shuffled by (seed, epoch), padded into micro-batches."""
    def batches(epoch, seed):
        order = np.random.default_rng([seed, epoch]).permutation(len(seqs))
        out = [collate_causal([seqs[i] for i in order[j:j + batch_size]], pad_id=0) for j in range(0, len(seqs), batch_size)]
        return out if on_yield is None else _Counting(out, on_yield)
    return batches


class _Counting(list):
    """A list whose iteration calls ``on_yield()`` before each item (to kill a run mid-epoch)."""

    def __init__(self, items, on_yield):
        super().__init__(items)
        self.on_yield = on_yield

    def __iter__(self):
        for item in list.__iter__(self):
            self.on_yield()
            yield item


class Killed(Exception):
    pass


def loss_on(seqs):
    batch = collate_causal(seqs, pad_id=0)

    def on_eval(step, model):
        return {"loss_all": float(model(**batch).loss)}
    return on_eval


def strip_time(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


def test_collate_causal_masks_padding_only():
    b = collate_causal([[5, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_loss_decreases_on_a_repeated_batch(tmp_path):
    seqs = sentences(4)
    model = tiny_model(dropout=0.0)
    args = TrainArgs(learning_rate=1e-2, warmup_ratio=0.0, batch_size=4, epochs=40, seed=0)
    hist = train(model, lambda epoch, seed: [collate_causal(seqs, 0)], args, tmp_path, eval_every=20,
                 on_eval=loss_on(seqs))
    assert [h["step"] for h in hist] == [0, 20, 40]
    assert hist[0]["loss_all"] == pytest.approx(math.log(48), abs=0.15)  # random init: ~uniform over 48 tokens
    assert hist[-1]["loss_all"] < 0.5 * hist[0]["loss_all"]
    assert hist[1]["train_loss"] > hist[2]["train_loss"]
    assert not model.training  # handed back in eval mode


def test_each_update_bumps_the_weights_version_counters(tmp_path):
    """On the CPU the optimizer is torch's fused AdamW, which updates in place without bumping the version counters that
    LM.weights_hash's cache keys on (before the bump: overspec scored every evaluation point with step 0's hash)."""
    model = tiny_model(dropout=0.0)
    seen = []

    def on_eval(step, m):
        seen.append((sum(p._version for p in m.parameters()), torch.cat([p.detach().flatten() for p in m.parameters()])))
        return {}

    args = TrainArgs(learning_rate=1e-2, warmup_ratio=0.0, batch_size=4, max_steps=2, seed=0)
    train(model, lambda epoch, seed: [collate_causal(sentences(4), 0)], args, tmp_path, eval_every=1, on_eval=on_eval)
    assert len(seen) == 3
    for (v0, w0), (v1, w1) in zip(seen, seen[1:]):
        assert v1 > v0 and not torch.equal(w0, w1)
    from knnlm.train import _optimizer

    assert _optimizer(model, args, "cpu", False).defaults["fused"] is True
    assert _optimizer(model, args, "cuda", False).defaults["fused"] is None  # torch's default, the GPU records' kernel


def _run(tmp_path, name, args, kill_after=None, eval_every=4, calls=None, **train_kw):
    """One (possibly killed) training run into tmp_path/name; returns (model, history or None, micro-batches read)."""
    seqs = sentences(10)
    read = [0]

    def on_yield():
        read[0] += 1
        if kill_after is not None and read[0] > kill_after:
            raise Killed

    def on_eval(step, model):
        if calls is not None:
            calls.append(step)
        return loss_on(seqs[:4])(step, model)

    model = tiny_model(seed=1)
    try:
        hist = train(model, sentence_batches(seqs, 2, on_yield), args, tmp_path / name, eval_every=eval_every,
                     on_eval=on_eval, **train_kw)
    except Killed:
        hist = None
    return model, hist, read[0]


def test_resume_after_kill_is_bit_identical(tmp_path):
    # 10 sentences, batches of 2 -> 5 micro-batches/epoch, 2 per step -> 3 steps/epoch (the last of one micro-batch)
    args = TrainArgs(learning_rate=3e-3, warmup_ratio=0.2, gradient_accumulation_steps=2, epochs=4, seed=3,
                     checkpoint_every=5, weight_decay=0.1)
    calls = []
    ref_model, ref_hist, ref_read = _run(tmp_path, "ref", args, calls=calls)
    assert calls == [0, 4, 8, 12] and [h["step"] for h in ref_hist] == [0, 4, 8, 12]
    assert [h["epoch"] for h in ref_hist] == [0, 1, 2, 4]
    assert ref_read == 4 * 5

    # killed while reading micro-batch 14 (epoch 2, step 8): the last checkpoint is step 5 (epoch 1, 4 of 5 read)
    _, hist, read = _run(tmp_path, "run", args, kill_after=13)
    assert hist is None and read == 14
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 5
    calls = []
    model, hist, read = _run(tmp_path, "run", args, calls=calls)  # a fresh model, as after a restart
    assert calls == [8, 12]  # steps 0 and 4 were evaluated before the kill and are in the checkpoint
    assert read == 5 + 5 + 5  # epoch 1 (its 4 consumed micro-batches skipped), epochs 2 and 3
    assert strip_time(hist) == strip_time(ref_hist)
    ref, got = ref_model.state_dict(), model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    # a finished run is not retrained: weights are restored from the checkpoint
    model, hist, read = _run(tmp_path, "run", args)
    assert read == 0 and strip_time(hist) == strip_time(ref_hist)
    assert torch.equal(model.transformer.wte.weight, ref_model.transformer.wte.weight)


def test_without_end_checkpoints_a_rerun_redoes_the_ends_to_the_same_weights(tmp_path):
    """checkpoint_ends=False writes no checkpoint at step 0 nor of the finished run: the same numbers; a kill before
    the first checkpoint starts again at step 0 and a rerun of the finished run goes on from its last checkpoint, both
    to the reference's history and weights."""
    args = TrainArgs(learning_rate=3e-3, warmup_ratio=0.2, gradient_accumulation_steps=2, epochs=4, seed=3,
                     checkpoint_every=5, weight_decay=0.1)
    ref_model, ref_hist, _ = _run(tmp_path, "ref", args)
    ref = ref_model.state_dict()
    calls = []
    model, hist, read = _run(tmp_path, "run", args, calls=calls, checkpoint_ends=False)
    assert calls == [0, 4, 8, 12] and read == 20 and strip_time(hist) == strip_time(ref_hist)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    # the last checkpoint is checkpoint_every's step 10, not the finished run (step 12); no step 0 either
    assert json.loads((tmp_path / "run" / "latest.json").read_text()) == {"dir": "step-10", "step": 10, "done": False}
    calls = []
    model, hist, read = _run(tmp_path, "run", args, calls=calls, checkpoint_ends=False)  # the finished run again
    # epoch 3 (steps 10-12) read again, its 2 consumed micro-batches skipped; only step 12 evaluated
    assert calls == [12] and read == 5 and strip_time(hist) == strip_time(ref_hist)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())

    _, hist, read = _run(tmp_path, "early", args, kill_after=3, checkpoint_ends=False)  # killed in step 2
    assert hist is None and read == 4 and not (tmp_path / "early" / "latest.json").exists()  # no checkpoint to resume
    calls = []
    model, hist, _ = _run(tmp_path, "early", args, calls=calls, checkpoint_ends=False)
    assert calls == [0, 4, 8, 12] and strip_time(hist) == strip_time(ref_hist)
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


def test_eval_points_with_max_steps_beyond_one_epoch(tmp_path):
    args = TrainArgs(learning_rate=1e-3, max_steps=11, seed=0)  # 5 steps/epoch, read over 3 epochs
    calls = []
    _, hist, read = _run(tmp_path, "a", args, eval_every=4, calls=calls)
    assert calls == [0, 4, 8, 11] and read == 11
    assert [h["epoch"] for h in hist] == [0, 0, 1, 2]
    assert hist[-1]["lr"] == 0.0  # linear decay ends at 0 on the last step
    assert hist[1]["lr"] == pytest.approx(1e-3 * (11 - 4) / (11 - 1))  # warm-up of ceil(0.05 * 11) = 1 step


def test_resume_refuses_other_settings(tmp_path):
    args = TrainArgs(learning_rate=1e-3, max_steps=3, seed=0)
    _run(tmp_path, "a", args)
    with pytest.raises(KnnlmError, match="learning_rate"):
        _run(tmp_path, "a", TrainArgs(learning_rate=2e-3, max_steps=3, seed=0))


def test_peft_checkpoint_holds_only_the_adapter_and_resumes(tmp_path):
    from peft import LoraConfig, get_peft_model

    seqs = sentences(6)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["c_attn"], fan_in_fan_out=True)
    args = TrainArgs(learning_rate=1e-2, max_steps=6, seed=0, checkpoint_every=2)

    def run(name, kill_after=None):
        """-> (model, history or None when killed, micro-batches read)."""
        n = [0]

        def on_yield():
            n[0] += 1
            if kill_after is not None and n[0] > kill_after:
                raise Killed
        torch.manual_seed(5)
        model = get_peft_model(tiny_model(seed=2), lora)
        try:
            hist = train(model, sentence_batches(seqs, 2, on_yield), args, tmp_path / name)
        except Killed:
            hist = None
        return model, hist, n[0]

    # 6 sentences, batches of 2 -> 3 micro-batches (= steps) per epoch; 6 steps: 2 epochs
    ref, ref_hist, ref_read = run("ref")
    assert ref_hist is not None and ref_read == 6
    # killed while reading micro-batch 6 (epoch 1, step 6): the last checkpoint is step 4 (epoch 1, 1 of 3 read)
    _, hist, read = run("run", kill_after=5)
    assert hist is None and read == 6
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 4
    (ckpt,) = (tmp_path / "run").glob("step-*/state.pt")  # older checkpoints dropped
    assert ckpt.parent.name == "step-4"
    state = torch.load(ckpt, weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])
    got, hist, read = run("run")  # a fresh model, as after a restart
    assert read == 3  # epoch 1 only (a restart reads 6): its consumed micro-batch passed over, the 2 left trained on
    assert strip_time(hist) == strip_time(ref_hist)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    lora_b = next(k for k in ref_sd if "lora_B" in k)
    assert ref_sd[lora_b].abs().sum() > 0  # trained (LoRA's B starts at zero)


def test_block_batches_cover_each_block_once_per_epoch():
    tokens = np.arange(103, dtype=np.int32)
    e0, e1 = BlockBatches(tokens, 10, 4, seed=1, epoch=0), BlockBatches(tokens, 10, 4, seed=1, epoch=1)
    assert len(e0) == 3  # 10 blocks (3 tokens dropped), batches of 4, 4, 2
    firsts0 = [int(x) for b in e0 for x in b["input_ids"][:, 0]]
    firsts1 = [int(x) for b in e1 for x in b["input_ids"][:, 0]]
    assert sorted(firsts0) == sorted(firsts1) == list(range(0, 100, 10)) and firsts0 != firsts1
    b = next(iter(e0))
    assert torch.equal(b["labels"], b["input_ids"]) and b["input_ids"][0].tolist() == list(range(firsts0[0], firsts0[0] + 10))
    assert firsts0 == [int(x) for b in BlockBatches(tokens, 10, 4, seed=1, epoch=0) for x in b["input_ids"][:, 0]]


def test_perplexity_scores_each_token_once():
    model = tiny_model(dropout=0.0).eval()
    tokens = np.random.default_rng(0).integers(0, 48, size=30).astype(np.int32)
    with torch.no_grad():
        ids = torch.as_tensor(tokens, dtype=torch.long)[None]
        full = float(model(input_ids=ids, labels=ids).loss)  # one window holding everything
    whole = perplexity(model, tokens, block_size=32, batch_size=3)
    assert whole["val_tokens"] == 29 and whole["val_loss"] == pytest.approx(full, rel=1e-6)
    # windows of 8 overlapping by one token: 29 targets, each scored once, in windows [0,8) [7,15) [14,22) [21,29) [28,30)
    with torch.no_grad():
        nll = 0.0
        for s, e in [(0, 8), (7, 15), (14, 22), (21, 29), (28, 30)]:
            w = ids[:, s:e]
            nll += float(model(input_ids=w, labels=w).loss) * (e - s - 1)
    short = perplexity(model, tokens, block_size=8, batch_size=2)
    assert short["val_tokens"] == 29 and short["val_loss"] == pytest.approx(nll / 29, rel=1e-6)


def test_a_bpe_vocabulary_the_corpus_cannot_fill_is_said(tmp_path, caplog):
    from knnlm.experiments.lm.data import build_tokenizer

    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    with caplog.at_level("WARNING", logger="knnlm.experiments.lm.data"):
        assert len(build_tokenizer("bpe:300", tmp_path / "train.txt", 64)) == 300 and not caplog.records
        made = len(build_tokenizer("bpe:50000", tmp_path / "train.txt", 64))
    assert 300 < made < 50000
    assert [r.getMessage() for r in caplog.records] == [
        f"--tokenizer bpe:50000: {tmp_path / 'train.txt'} has too few repeated pairs for 50000 tokens; the vocabulary "
        f"is {made} (the records' vocab_size)"]


def test_bpe_tokenizer_round_trips_and_is_deterministic(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    tok = train_bpe_tokenizer([tmp_path / "train.txt"], 300)
    assert len(tok) == 300 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    unseen = "Zürich's 💡 idea:\tnew\r\nlines  and   spaces ; ξ"
    for text in (TEXT, unseen):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("a<|endoftext|>b")["input_ids"][1] == 0  # the special token is one id
    assert tok.tokenize(" Valkyria") == ["ĠValkyria"]  # the most frequent words are merged into one token
    assert len(tok(TEXT)["input_ids"]) < 0.65 * len(TEXT.encode("utf-8"))
    tok.save_pretrained(tmp_path / "tok")
    again = train_bpe_tokenizer([tmp_path / "train.txt"], 300)
    again.save_pretrained(tmp_path / "tok2")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (tmp_path / "tok2" / "tokenizer.json").read_bytes()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(unseen)["input_ids"] == tok(unseen)["input_ids"] and loaded.eos_token_id == 0


def test_bpe_tokenizer_of_rows_learns_their_text_not_their_syntax(tmp_path):
    """Before: a JSONL training file was read as plain text, its `{"text": "` and escapes learnt as merges."""
    import pandas as pd

    lines = TEXT.splitlines()
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines), encoding="utf-8")
    pd.DataFrame({"text": lines}).to_parquet(tmp_path / "train.parquet")
    vocab = train_bpe_tokenizer([tmp_path / "train.txt"], 300).get_vocab()
    assert train_bpe_tokenizer([tmp_path / "train.jsonl"], 300).get_vocab() == vocab
    assert train_bpe_tokenizer([tmp_path / "train.parquet"], 300).get_vocab() == vocab


def test_lm_train_cli_saves_a_loadable_model(tmp_path, capsys):
    from knnlm.cli import main

    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "valid.txt").write_text(TEXT[:300], encoding="utf-8")
    out = tmp_path / "m"
    argv = ["lm", "train", "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
            "--size", "tiny", "--tokenizer", "bpe:280", "--block_size", "32", "--batch_size", "4", "--max_steps", "6",
            "--eval_every", "3", "--learning_rate", "5e-3", "--output_dir", str(out)]
    assert main(argv) == 0
    rec = json.loads((out / "training.json").read_text())
    assert [h["step"] for h in rec["history"]] == [0, 3, 6] and rec["vocab_size"] == 280
    blocks = rec["train_tokens"] // 32  # an epoch: ceil(blocks / 4) steps, its last one short where 4 does not divide
    assert rec["epochs"] == pytest.approx(6 / math.ceil(blocks / 4))
    assert rec["history"][-1]["val_ppl"] < rec["history"][0]["val_ppl"]
    assert not (out / "work").exists() and (out / "val_ppl.png").is_file() and (out / "results.json").is_file()
    assert json.loads((out / "results.json").read_text())["metrics"]["val_ppl"] == rec["val_ppl"]

    # the saved folder reproduces the in-memory final evaluation (same logits -> same perplexity)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    tokens = np.asarray(tok(TEXT[:300])["input_ids"], dtype=np.int32)
    assert perplexity(model, tokens, 32)["val_ppl"] == pytest.approx(rec["val_ppl"], rel=1e-6)
    assert model.config.n_positions == 32 and model.config.eos_token_id == 0

    from knnlm.models import ModelArgs, load_model
    lm = load_model(ModelArgs(model_name_or_path=str(out), device="cpu"))
    ids = torch.as_tensor(tokens[:20], dtype=torch.long)[None]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    logits, _ = lm.forward(ids, torch.ones_like(ids))
    assert torch.allclose(logits, ref, atol=1e-5) and lm.encode(TEXT[:50]) == tok(TEXT[:50])["input_ids"]

    # a rerun of the finished command is a no-op (it deletes a work/ left by a run killed after writing its record);
    # other settings are refused
    capsys.readouterr()
    (out / "work" / "checkpoint").mkdir(parents=True)
    assert main(argv) == 0 and "validation perplexity" in capsys.readouterr().out and not (out / "work").exists()
    assert main(argv[:-2] + ["--output_dir", str(out), "--learning_rate", "1e-3"]) == 2
    # a corpus file replaced under the same name: refused naming it (before: "already holds this model", exit 0, and a
    # killed run resumed its checkpoint of the old text on the new one)
    original = (tmp_path / "train.txt").read_bytes()
    (tmp_path / "train.txt").write_text(TEXT[::-1], encoding="utf-8")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"knnlm: error: --train_file: {tmp_path / 'train.txt'} is not the text {out} was trained on")
    assert err.count("\n") == 1
    (tmp_path / "train.txt").write_bytes(original)
    # a run recorded before the corpora's hashes were (marker and record without them) is still this one
    for name, field in (("training.json", "run_key"), ("knnlm-run.json", "inputs")):
        record = json.loads((out / name).read_text())
        del record[field]["corpus_sha256"]
        (out / name).write_text(json.dumps(record))
    assert main(argv) == 0 and "validation perplexity" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a model")
    assert main(argv[:-2] + ["--output_dir", str(other), "--overwrite", "true"]) == 2  # never deletes foreign folders
    assert (other / "keep.txt").is_file()


_DDP_SCRIPT = '''
import os, sys
import torch
sys.path.insert(0, {tests!r})
from test_train import Killed, sentence_batches, sentences, tiny_model
from knnlm.train import TrainArgs, train
torch.set_num_threads(1)
ckpt, kill = sys.argv[1], int(sys.argv[2])
n = [0]
def on_yield():
    n[0] += 1
    if kill and n[0] > kill:
        raise Killed
model = tiny_model(seed=1)
args = TrainArgs(learning_rate=3e-3, gradient_accumulation_steps=2, epochs=3, seed=1, checkpoint_every=2)
try:
    hist = train(model, sentence_batches(sentences(12), 2, on_yield), args, ckpt, eval_every=2)
except Killed:
    sys.exit(0)
torch.save(model.state_dict(), ckpt + ".rank" + os.environ["RANK"] + ".pt")
print("steps", [h["step"] for h in hist], "epochs", [h["epoch"] for h in hist])
'''


@pytest.mark.slow
def test_two_processes_shard_and_resume_bit_identically(tmp_path):
    """torchrun, 2 CPU processes (gloo): 12 sentences in 6 micro-batches -> 3 per process -> 2 steps per epoch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(ckpt, kill, port):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(tmp_path / ckpt), str(kill)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    ref = run("ref", 0, 29731)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "steps [0, 2, 4, 6] epochs [0, 1, 2, 3]" in ref.stdout
    assert run("run", 12, 29732).returncode == 0  # both processes killed in epoch 2 (after the step-4 checkpoint)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "step-4").iterdir()) == ["rng-0.pt", "rng-1.pt", "state.pt"]
    assert run("run", 0, 29733).returncode == 0
    for rank in (0, 1):
        a = torch.load(tmp_path / f"ref.rank{rank}.pt")
        b = torch.load(tmp_path / f"run.rank{rank}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = torch.load(tmp_path / "ref.rank0.pt"), torch.load(tmp_path / "ref.rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were synchronized


_DDP_UNEVEN_SCRIPT = '''
import os, sys
import torch
sys.path.insert(0, {tests!r})
from test_train import sentences, tiny_model
from knnlm.train import TrainArgs, collate_causal, train
torch.set_num_threads(1)
seqs = sentences(16)
short, long = sorted(seqs, key=len)[:2], sorted(seqs, key=len)[-6:]  # 2 short sentences, 6 long ones
micro = [collate_causal(short, 0), collate_causal(long, 0)]
model = tiny_model(dropout=0.0)
args = TrainArgs(learning_rate=1e-3, warmup_ratio=0.0, batch_size=2, gradient_accumulation_steps=int(sys.argv[2]),
                 max_steps=2, max_grad_norm=0.0, seed=0)
losses = []
train(model, lambda epoch, seed: micro, args, sys.argv[1], on_step=lambda step, loss, group: losses.append(loss))
torch.save({{"weights": model.state_dict(), "losses": losses}}, sys.argv[1] + ".rank" + os.environ.get("RANK", "0") + ".pt")
'''


@pytest.mark.slow
def test_two_processes_weigh_every_label_of_the_step_the_same(tmp_path):
    """torchrun, 2 CPU processes, a micro-batch each (2 short sentences on one, 6 long ones on the other) take the steps
    of one process accumulating both (token-weighted) and log its losses; before, DDP's mean of the two processes'
    means weighed the short batch's labels several times more."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_uneven.py"
    script.write_text(_DDP_UNEVEN_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "2"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29741", str(script), str(tmp_path / "two"), "1"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    ref = torch.load(tmp_path / "one.rank0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"two.rank{rank}.pt")
        for k in ref["weights"]:
            torch.testing.assert_close(got["weights"][k], ref["weights"][k], atol=2e-6, rtol=0)
        # each process logs the step's mean loss over every label (it logged its own scaled share: 0.89 for 10.8)
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)


def test_accumulated_micro_batches_of_uneven_lengths_are_one_batch(tmp_path):
    """Each micro-batch's mean loss is weighted by its tokens: 2 x 4 sentences of different lengths take the steps
    of one batch of 8 (before: the mean of the two means, a different gradient: 4e-3 off after 2 steps at lr 1e-3)."""
    seqs = sentences(16)
    runs = {}
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        model = tiny_model(dropout=0.0)
        args = TrainArgs(learning_rate=1e-3, warmup_ratio=0.0, batch_size=batch_size, gradient_accumulation_steps=accum,
                         max_steps=2, max_grad_norm=0.0, seed=0)
        steps = []
        train(model, lambda epoch, seed: [collate_causal(seqs[j:j + batch_size], 0) for j in range(0, 16, batch_size)],
              args, tmp_path / f"{batch_size}x{accum}", on_step=lambda step, loss, micro: steps.append(loss))
        runs[(batch_size, accum)] = (steps, torch.cat([p.detach().flatten() for p in model.parameters()]))
    ref_steps, ref_weights = runs[(8, 1)]
    for key in ((4, 2), (2, 4)):
        steps, weights = runs[key]
        assert steps == pytest.approx(ref_steps, rel=1e-6), key
        torch.testing.assert_close(weights, ref_weights, atol=2e-6, rtol=0)
