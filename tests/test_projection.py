"""Projection study (Eq. 2): the KL direction by hand, Adam as torch's, the stopping rule, recovery of a reachable
target, fg_to_y, and the CLI's perplexities against `knnlm eval` on the same tokens."""
import json
import math

import numpy as np
import pytest
import torch

from knnlm.cli import main
from knnlm.experiments import projection as P

TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together on a mat.\n" * 3
VALID = "the dog sat on the mat. a cat sat on the log. the cat and the dog.\n"


def _states(lm, text, point):
    ids = torch.tensor([lm.encode(text)])
    with torch.no_grad():
        return lm.hidden_states(ids, torch.ones_like(ids), point)[0]  # [T, d]


def test_kl_direction_by_hand():
    q, p = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    logits = torch.tensor([[math.log(x) + 3.0 for x in q]], requires_grad=True)  # softmax(logits) = q
    kl = P.kl_from_logits(logits, torch.tensor([[math.log(x) for x in p]]))
    by_hand = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.1 * math.log(0.1 / 0.2)  # KL[q ‖ p] = 0.18379
    reverse = 0.4 * math.log(0.4 / 0.7) + 0.4 * math.log(0.4 / 0.2) + 0.2 * math.log(0.2 / 0.1)  # KL[p ‖ q] = 0.19204
    assert kl.item() == pytest.approx(by_hand, abs=1e-6) and abs(kl.item() - reverse) > 5e-3
    # closed-form gradient q ⊙ (log q − log p − KL) equals autograd of the plain formula
    kl.backward()
    x = logits.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(x, -1)
    (lq.exp() * (lq - torch.tensor([[math.log(v) for v in p]]))).sum().backward()
    torch.testing.assert_close(logits.grad, x.grad)
    qt = torch.tensor(q)
    torch.testing.assert_close(logits.grad[0], qt * (torch.log(qt / torch.tensor(p)) - by_hand))


def test_solver_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    z0, c = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    sol = P.solve(lambda z, rows: ((z - c[rows]) ** 4).sum(-1), z0, lr=0.05, tol=0.0, max_steps=7)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(7):
        opt.zero_grad()
        ((z - c) ** 4).sum().backward()
        opt.step()
    torch.testing.assert_close(sol.z, z.detach())
    assert sol.steps.tolist() == [7, 7, 7]
    torch.testing.assert_close(sol.objective, ((z.detach() - c) ** 4).sum(-1))
    torch.testing.assert_close(sol.objective_init, ((z0 - c) ** 4).sum(-1))


def test_stopping_rule_is_per_position(tiny_lm):
    z0 = _states(tiny_lm, "the cat sat on the mat", "block_output")[:2].clone()  # [2, d]
    with torch.no_grad():
        target = tiny_lm.f(z0)  # row 0: exactly f(z0[0]), already optimal
        target[1] = torch.log_softmax(torch.randn(target.shape[1], generator=torch.Generator().manual_seed(1)), -1)
    fn = P.logits_fn(tiny_lm, "f")
    sol = P.solve(lambda z, rows: P.kl_from_logits(fn(z), target[rows]), z0, lr=0.1, tol=1e-3, max_steps=40)
    assert sol.steps[0].item() == 1 and torch.equal(sol.z[0], z0[0])  # stopped after one step that changed nothing
    assert sol.objective[0].item() == 0.0
    assert sol.steps[1].item() > 1 and not torch.equal(sol.z[1], z0[1])  # the other one kept going
    assert sol.objective[1] < sol.objective_init[1]


@pytest.mark.parametrize("target", ["f", "fg"])
def test_reachable_target_is_recovered(tiny_lm, target):
    point = P.TARGETS[target]
    states = _states(tiny_lm, "the cat sat on the mat. a dog sat on the log", point)
    z_true, z_start = states[1:7], states[:6]  # start each position from its left neighbour's state
    gold = torch.tensor(tiny_lm.encode("the cat sat on the mat. a dog sat on the log")[2:8])
    fn = P.logits_fn(tiny_lm, target)
    with torch.no_grad():
        target_logp = torch.log_softmax(fn(z_true), -1)  # exactly f(z_true) (or f(g(z_true)))
    # tol well below the KL asked for: the stopping rule halts once a step gains < tol, i.e. at KL ~ tol
    res = P.project(tiny_lm, target, z_start, target_logp, gold, lr=0.1, tol=1e-5, max_steps=1000)
    assert res["kl_init"].mean() > 1e-2  # the start is genuinely off
    assert res["kl"].max() < 1e-3
    ppl_target = math.exp(-float(target_logp.gather(1, gold[:, None]).mean()))
    ppl_proj = math.exp(-float(res["logp"].mean()))
    assert ppl_proj == pytest.approx(ppl_target, rel=2e-2)
    assert (res["steps"] > 1).all() and (res["steps"] < 1000).all()


def test_fg_to_y_raises_gold_log_prob(tiny_lm):
    text = "the cat sat on the mat"
    z0 = _states(tiny_lm, text, "ffn_residual")[:-1]
    gold = torch.tensor(tiny_lm.encode(text)[1:])
    with torch.no_grad():
        before = tiny_lm.f(tiny_lm.g(z0)).gather(1, gold[:, None])[:, 0]
    res = P.project(tiny_lm, "fg_to_y", z0, before.new_zeros(len(gold), tiny_lm.vocab_size), gold, lr=0.1,
                    tol=1e-3, max_steps=30)
    assert (res["logp"] > before + 0.5).all()
    torch.testing.assert_close(res["objective"], -res["logp"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def common(tiny_gpt2_dir, tmp_path_factory):
    """A datastore of TRAIN and the flags every run below shares."""
    root = tmp_path_factory.mktemp("projection")
    (root / "train.txt").write_text(TRAIN)
    (root / "valid.txt").write_text(VALID)
    assert main(["datastore", "build", "--model_name_or_path", str(tiny_gpt2_dir), "--train_file",
                 str(root / "train.txt"), "--output_dir", str(root / "ds")]) == 0
    return ["--model_name_or_path", str(tiny_gpt2_dir), "--validation_file", str(root / "valid.txt"),
            "--datastore", str(root / "ds"), "--k", "16", "--lmbda", "0.25"]


def test_cli_end_to_end_matches_eval(common, tiny_lm, tmp_path):
    out = tmp_path / "proj"
    assert main(["analyze", "projection", *common, "--target", "f,fg,fg_to_y", "--max_steps", "10",
                 "--batch_size", "7", "--output_dir", str(out)]) == 0
    assert main(["eval", *common, "--output_dir", str(tmp_path / "eval")]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert m["n_tokens"] == ev["n_tokens"] == len(tiny_lm.encode(VALID)) - 1
    assert m["ppl_lm"] == pytest.approx(ev["ppl_lm"], rel=1e-5)
    assert m["ppl_knnlm"] == pytest.approx(ev["ppl_knnlm"], rel=1e-5)
    tg = m["targets"]
    # f(block_output) and f(g(ffn_residual)) are the LM itself: the KL at z0 is KL[p_lm ‖ p_knnlm]
    assert tg["f"]["kl_init_mean"] == pytest.approx(m["kl_lm_knnlm"]["mean"], rel=1e-3, abs=1e-6)
    assert tg["fg"]["kl_init_mean"] == pytest.approx(m["kl_lm_knnlm"]["mean"], rel=1e-3, abs=1e-6)
    # (a random tiny model's f cannot reach p_knnlm: its final norm bounds the logits, so no KL gain is asserted here)
    assert tg["fg_to_y"]["ppl_proj"] < m["ppl_lm"]
    assert 1 <= tg["f"]["steps_median"] <= 10 and tg["f"]["steps_max"] <= 10
    arrays = np.load(out / "per_token.npz")
    assert len(arrays["f.kl"]) == m["n_tokens"]
    assert math.exp(-arrays["f.logp"].astype(np.float64).mean()) == pytest.approx(tg["f"]["ppl_proj"])
    assert (out / "kl_f.png").stat().st_size > 0 and (out / "kl_fg_to_y.png").exists()
    md = (out / "results.md").read_text()
    assert "16.76" in md and "19.41" in md and "0.07" in md
    assert not (out / "partial.npz").exists()


def test_resume_after_kill_gives_same_results(common, tmp_path, monkeypatch):
    args = ["analyze", "projection", *common, "--block_size", "8", "--stride", "4", "--max_tokens", "16",
            "--target", "f", "--max_steps", "5", "--batch_size", "4"]  # groups of one window
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(P, "_CHECKPOINT_EVERY_S", 0.0)
    real, calls = P.project, []

    def dies_on_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(P, "project", dies_on_third_batch)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 130
    assert json.loads((tmp_path / "resumed" / "partial.json").read_text())["windows_done"] == 1  # [7, 4, 4] targets
    monkeypatch.setattr(P, "project", real)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 0
    a, b = np.load(tmp_path / "whole" / "per_token.npz"), np.load(tmp_path / "resumed" / "per_token.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("extra, needle", [
    (["--target", "f,softmax"], "--target"),
    (["--lmbda", "1"], "--lmbda"),
    (["--lmbda", "0.25,0.5"], "--lmbda"),
    (["--lr", "0"], "--lr"),
])
def test_bad_input(common, tmp_path, capsys, extra, needle):
    assert main(["analyze", "projection", *common, *extra, "--output_dir", str(tmp_path / "out")]) == 2
    assert f"knnlm: error: {needle}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()

