"""Projection study (Eq. 2): the KL direction by hand, Adam as torch's, best iterate and stopping rules, the paper's f
(output layer only) vs f_norm, recovery of a reachable target, fg_to_y, tolerance lists, and the CLI's perplexities
against `knnlm eval` on the same tokens."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import empty_list_ivf

from knnlm.claims import check_record
from knnlm.cli import main
from knnlm.experiments.projection import report as PR, run as PRUN, settings as PS, solver as PV
from knnlm.stats import share_of_gain

TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together on a mat.\n" * 3
VALID = "the dog sat on the mat. a cat sat on the log. the cat and the dog.\n"


def _states(lm, text, point):
    ids = torch.tensor([lm.encode(text)])
    with torch.no_grad():
        return lm.hidden_states(ids, torch.ones_like(ids), point)[0]  # [T, d]


def test_kl_direction_by_hand():
    q, p = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    logits = torch.tensor([[math.log(x) + 3.0 for x in q]], requires_grad=True)  # softmax(logits) = q
    kl = PV.kl_from_logits(logits, torch.tensor([[math.log(x) for x in p]]))
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


def test_solver_is_torch_adam_and_keeps_the_best_iterate():
    g = torch.Generator().manual_seed(0)
    z0, c = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    sol = PV.solve(lambda z, rows: ((z - c[rows]) ** 4).sum(-1), z0, lr=0.5, tol=0.0, max_steps=12)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.5)
    values = [((z0 - c) ** 4).sum(-1)]  # the trajectory's objective per step, z0 first
    for _ in range(12):
        opt.zero_grad()
        ((z - c) ** 4).sum().backward()
        opt.step()
        values.append(((z.detach() - c) ** 4).sum(-1))
    torch.testing.assert_close(sol.z_last, z.detach())  # the trajectory is torch's Adam
    values = torch.stack(values)  # [13, 3]
    torch.testing.assert_close(sol.objective[0], values.min(0).values)  # what is kept is the best iterate
    assert sol.best_step[0].tolist() == values.argmin(0).tolist()
    assert (values[-1] > values.min(0).values).any()  # lr 0.5 overshoots: the last iterate is not the best
    torch.testing.assert_close(sol.objective[0], ((sol.z[0] - c) ** 4).sum(-1))
    assert sol.steps.tolist() == [[12, 12, 12]] and sol.stop.tolist() == [[2, 2, 2]]  # tol 0: all by max_steps
    torch.testing.assert_close(sol.objective_init, values[0])


def test_optimal_start_keeps_z0(tiny_lm):
    z0 = _states(tiny_lm, "the cat sat on the mat", "final_hidden")[:2].clone()  # [2, d]
    fn = PV.logits_fn(tiny_lm, "f_out")
    with torch.no_grad():
        target = torch.log_softmax(fn(z0), -1)  # row 0: exactly f(z0[0]), already optimal
        target[1] = torch.log_softmax(torch.randn(target.shape[1], generator=torch.Generator().manual_seed(1)), -1)
    sol = PV.solve(lambda z, rows: PV.kl_from_logits(fn(z), target[rows]), z0, lr=0.1, tol=1e-3, max_steps=40)
    assert torch.equal(sol.z[0, 0], z0[0]) and sol.best_step[0, 0].item() == 0  # z0 kept
    assert sol.steps[0, 0].item() == 1 and sol.stop[0, 0].item() == 0  # stopped by tol after one step
    assert sol.objective[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert sol.steps[0, 1].item() > 1 and not torch.equal(sol.z[0, 1], z0[1])  # the other one kept going
    assert sol.objective[0, 1] < sol.objective_init[1]


@pytest.mark.parametrize("target", ["f_out", "f_norm", "fg"])
def test_best_iterate_never_worse_than_start(tiny_lm, target):
    """lr 1 makes Adam overshoot; whatever the trajectory does, no position ends above its KL at z0."""
    z0 = _states(tiny_lm, "the cat sat on the mat. a dog sat on the log", PS.TARGETS[target])
    gold = torch.tensor(tiny_lm.encode("the cat sat on the mat. a dog sat on the log")[1:] + [0])
    g = torch.Generator().manual_seed(3)
    target_logp = torch.log_softmax(3 * torch.randn(len(z0), tiny_lm.vocab_size, generator=g), -1)
    with torch.no_grad():  # half of the positions start near their optimum: a big step can only hurt them
        target_logp[::2] = torch.log_softmax(PV.logits_fn(tiny_lm, target)(z0[::2]) + 0.01 * target_logp[::2], -1)
    res = PV.project(tiny_lm, target, z0, target_logp, gold, lr=1.0, tol=[1e-3, 0.0], max_steps=15)
    assert (res["kl"] <= res["kl_init"][:, None]).all()
    fn = PV.logits_fn(tiny_lm, target)
    sol = PV.solve(lambda z, rows: PV.kl_from_logits(fn(z), target_logp[rows]), z0, lr=1.0, tol=0.0, max_steps=15)
    with torch.no_grad():
        last = PV.kl_from_logits(fn(sol.z_last), target_logp)
    assert (last > res["kl_init"]).any()  # the last iterate would have been worse somewhere
    assert (res["kl"][:, 1] <= res["kl"][:, 0]).all()  # running longer never loses the best


def test_paper_f_reaches_an_exactly_expressible_target(tiny_lm):
    text = "the cat sat on the mat. a dog sat on the log"
    states = _states(tiny_lm, text, "final_hidden")
    z_true, z_start = states[1:7], states[:6]  # start each position from its left neighbour's state
    gold = torch.tensor(tiny_lm.encode(text)[2:8])
    with torch.no_grad():
        target_logp = torch.log_softmax(tiny_lm.output_layer(z_true), -1)  # exactly f(z_true), f = output layer
    res = PV.project(tiny_lm, "f_out", z_start, target_logp, gold, lr=0.1, tol=0.0, max_steps=400)
    assert res["kl_init"].min() > 1e-2  # the start is genuinely off
    assert res["kl"].max() < 1e-4
    ppl_target = math.exp(-float(target_logp.gather(1, gold[:, None]).mean()))
    assert math.exp(-float(res["logp"].mean())) == pytest.approx(ppl_target, rel=1e-3)


def test_without_final_norm_both_f_coincide(tiny_gpt2_dir):
    """With the final norm removed (identity), final_hidden == block_output and f_out, f_norm give identical runs."""
    from knnlm.models import ModelArgs, load_model

    lm = load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))  # a private copy
    ident = torch.nn.Identity()
    lm.base.transformer.ln_f = ident  # GPT-2 without its final norm; the adapter's map to the output layer follows
    lm.final, lm._final_exit = torch.nn.Sequential(ident), ident
    text = "the cat sat on the mat. a dog sat on the log"
    ids = torch.tensor([lm.encode(text)])
    with torch.no_grad():
        h = lm.hidden_states(ids, torch.ones_like(ids), ("block_output", "final_hidden"))
    assert torch.equal(h["block_output"], h["final_hidden"])
    z0 = h["final_hidden"][0]
    gold = ids[0, 1:].tolist() + [0]
    gold = torch.tensor(gold)
    target_logp = torch.log_softmax(torch.randn(len(z0), lm.vocab_size, generator=torch.Generator().manual_seed(4)), -1)
    a = PV.project(lm, "f_out", z0, target_logp, gold, lr=0.1, tol=[1e-3, 0.0], max_steps=20)
    b = PV.project(lm, "f_norm", h["block_output"][0], target_logp, gold, lr=0.1, tol=[1e-3, 0.0], max_steps=20)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_with_final_norm_the_two_f_differ(tiny_lm):
    z = _states(tiny_lm, "the cat sat", "block_output")
    with torch.no_grad():
        assert not torch.allclose(PV.logits_fn(tiny_lm, "f_out")(z), PV.logits_fn(tiny_lm, "f_norm")(z))
        h = _states(tiny_lm, "the cat sat", "final_hidden")
        torch.testing.assert_close(PV.logits_fn(tiny_lm, "f_out")(h), PV.logits_fn(tiny_lm, "f_norm")(z))  # same LM at z0


def test_tolerance_columns_share_one_trajectory(tiny_lm):
    text = "the cat sat on the mat. a dog sat on the log"
    z0 = _states(tiny_lm, text, "final_hidden")
    gold = torch.tensor(tiny_lm.encode(text)[1:] + [0])
    target_logp = torch.log_softmax(torch.randn(len(z0), tiny_lm.vocab_size, generator=torch.Generator().manual_seed(5)), -1)
    both = PV.project(tiny_lm, "f_out", z0, target_logp, gold, lr=0.1, tol=[1e-2, 1e-4], max_steps=300)
    for j, tol in enumerate([1e-2, 1e-4]):
        alone = PV.project(tiny_lm, "f_out", z0, target_logp, gold, lr=0.1, tol=tol, max_steps=300)
        assert torch.equal(alone["steps"][:, 0], both["steps"][:, j])
        torch.testing.assert_close(alone["kl"][:, 0], both["kl"][:, j])
    assert (both["steps"][:, 1] >= both["steps"][:, 0]).all() and (both["kl"][:, 1] <= both["kl"][:, 0]).all()
    assert (both["steps"][:, 1] > both["steps"][:, 0]).any()


def test_patience_stops_a_stalled_position():
    z0 = torch.zeros(2, 1)
    c = torch.tensor([[0.0], [5.0]])  # row 0 starts at its optimum; Adam's first steps move it off and back
    sol = PV.solve(lambda z, rows: ((z - c[rows]) ** 2).sum(-1), z0, lr=0.5, tol=0.0, max_steps=200, patience=5)
    assert sol.stop[0, 0].item() == 1 and sol.steps[0, 0].item() == 5 and sol.best_step[0, 0].item() == 0
    assert sol.objective[0, 0].item() == 0.0
    assert sol.objective[0, 1] < 1e-2 and sol.steps[0, 1] > 5


def test_deprecated_f_is_f_norm(caplog):
    args = PS.ProjectionArgs(output_dir="x", datastore="y", target=["f", "fg"], tol=[0.0, 1e-3])
    with caplog.at_level("WARNING"):
        args.validate()
    assert args.target == ["f_norm", "fg"] and args.tol == [1e-3, 0.0]
    assert "deprecated" in caplog.text and "f_out" in caplog.text
    with pytest.raises(PS.KnnlmError, match="--target"):
        PS.ProjectionArgs(output_dir="x", datastore="y", target=["f", "f_norm"]).validate()


def test_scalar_tol_in_a_config_file_is_a_one_item_list(tmp_path):
    from knnlm.config import resolve

    (tmp_path / "c.yaml").write_text("output_dir: o\ndatastore: d\ntol: 0.001\n")  # written before --tol took a list
    (args,) = resolve([PS.ProjectionArgs], {}, tmp_path / "c.yaml")
    assert args.tol == [0.001]


def test_share_of_gain_by_hand():
    # mean gold log-probs: LM log 0.1, kNN-LM log 0.2, p_proj log 0.15 -> log(1.5) / log(2) of kNN's gain
    lm, knn, proj = math.log(0.1), math.log(0.2), math.log(0.15)
    assert share_of_gain(lm, knn, proj) == pytest.approx(math.log(1.5) / math.log(2))
    assert share_of_gain(lm, knn, knn) == 1.0 and share_of_gain(lm, knn, lm) == 0.0
    # perplexities (lower is better) give the same share: LM 20, kNN-LM 16, memory 18 keeps half
    assert share_of_gain(20.0, 16.0, 18.0) == 0.5 and math.isnan(share_of_gain(20.0, 20.0, 18.0))


@pytest.mark.parametrize("target", ["f_norm", "fg"])
def test_reachable_target_is_recovered(tiny_lm, target):
    point = PS.TARGETS[target]
    states = _states(tiny_lm, "the cat sat on the mat. a dog sat on the log", point)
    z_true, z_start = states[1:7], states[:6]  # start each position from its left neighbour's state
    gold = torch.tensor(tiny_lm.encode("the cat sat on the mat. a dog sat on the log")[2:8])
    fn = PV.logits_fn(tiny_lm, target)
    with torch.no_grad():
        target_logp = torch.log_softmax(fn(z_true), -1)  # exactly f(z_true) (or f(g(z_true)))
    # tol well below the KL asked for: the stopping rule halts once a step gains < tol, i.e. at KL ~ tol
    res = PV.project(tiny_lm, target, z_start, target_logp, gold, lr=0.1, tol=1e-5, max_steps=1000)
    assert res["kl_init"].mean() > 1e-2  # the start is genuinely off
    assert res["kl"].max() < 1e-3
    ppl_target = math.exp(-float(target_logp.gather(1, gold[:, None]).mean()))
    ppl_proj = math.exp(-float(res["logp"].mean()))
    assert ppl_proj == pytest.approx(ppl_target, rel=2e-2)
    assert (res["steps"] > 1).all() and (res["steps"] < 1000).all() and (res["stop"] == 0).all()


def test_fg_to_y_raises_gold_log_prob(tiny_lm):
    text = "the cat sat on the mat"
    z0 = _states(tiny_lm, text, "ffn_residual")[:-1]
    gold = torch.tensor(tiny_lm.encode(text)[1:])
    with torch.no_grad():
        before = tiny_lm.f(tiny_lm.g(z0)).gather(1, gold[:, None])[:, 0]
    res = PV.project(tiny_lm, "fg_to_y", z0, before.new_zeros(len(gold), tiny_lm.vocab_size), gold, lr=0.1,
                    tol=1e-3, max_steps=30)
    assert (res["logp"][:, 0] > before + 0.5).all()
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
    assert main(["analyze", "projection", *common, "--target", "f_out,f_norm,fg,fg_to_y", "--max_steps", "10",
                 "--tol", "1e-3,0", "--batch_size", "7", "--n_boot", "200", "--output_dir", str(out)]) == 0
    assert main(["eval", *common, "--output_dir", str(tmp_path / "eval")]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert m["n_tokens"] == ev["n_tokens"] == len(tiny_lm.encode(VALID)) - 1
    assert m["ppl_lm"] == pytest.approx(ev["ppl_lm"], rel=1e-5)
    assert m["ppl_knnlm"] == pytest.approx(ev["ppl_knnlm"], rel=1e-5)
    tg = m["targets"]
    # W final_hidden, f_norm(block_output) and f(g(ffn_residual)) are the LM itself: at z0 the KL is KL[p_lm ‖ p_knnlm]
    for t in ("f_out", "f_norm", "fg"):
        assert tg[t]["kl_init_mean"] == pytest.approx(m["kl_lm_knnlm"]["mean"], rel=1e-3, abs=1e-6)
        assert tg[t]["kl_mean"] <= tg[t]["kl_init_mean"] and tg[t]["worse_than_start_fraction"] == 0.0
    assert tg["fg_to_y"]["ppl_proj"] < m["ppl_lm"]
    assert 1 <= tg["f_out"]["steps_median"] <= 10 and tg["f_out"]["steps_max"] <= 10
    assert sum(tg["f_out"]["stopped_by"].values()) == m["n_tokens"]
    assert sum(c for _, _, c in tg["f_out"]["steps_histogram"]) == m["n_tokens"]
    assert [e["tol"] for e in m["by_tol"]] == [1e-3, 0.0]
    assert m["by_tol"][1]["targets"]["f_out"]["stopped_by"] == {"tol": 0, "patience": 0, "max_steps": m["n_tokens"]}
    for e in m["by_tol"]:
        for t in ("f_out", "fg"):
            ci, share = e["targets"][t]["ppl_proj_ci"], e["targets"][t]["share_of_knn_gain_ci"]
            assert ci["lo"] <= e["targets"][t]["ppl_proj"] <= ci["hi"] and share["lo"] <= share["point"] <= share["hi"]
        assert set(e["fg_gain_over_f_gain"]) == {"f_out", "f_norm"}
    assert m["ppl_lm_ci"]["lo"] <= m["ppl_lm"] <= m["ppl_lm_ci"]["hi"]
    # results.json carries Table 1's claims (3 targets x 2 tolerances) and Table 4's (2), each verdict re-derivable
    records = json.loads((out / "results.json").read_text())["claims"]
    assert len(records) == 8 and {r["statistic"] for r in records} == {"share of kNN's log-ppl gain", "f∘g gain / f gain (log ppl)"}
    for rec in records:
        check_record(rec)
        assert rec["verdict"] == "not judged"  # a one-line text: 1 block of 256 tokens
    assert (out / "results.md").read_text().count("| not judged") == 8
    arrays = np.load(out / "per_token.npz")
    assert arrays["f_out.kl"].shape == (m["n_tokens"], 2)
    assert math.exp(-arrays["f_out.logp"][:, 0].astype(np.float64).mean()) == pytest.approx(tg["f_out"]["ppl_proj"])
    mean = lambda x: float(np.mean(x, dtype=np.float64))  # noqa: E731
    assert share_of_gain(mean(arrays["lm"]), mean(arrays["knnlm"]), mean(arrays["fg.logp"][:, 0])) == pytest.approx(
        tg["fg"]["share_of_knn_gain"])
    assert (out / "kl_f_out.png").stat().st_size > 0 and (out / "kl_fg_to_y.png").exists()
    assert (out / "steps_f_out_tol0.001.png").exists() and (out / "steps_fg_tol0.png").exists()
    md = (out / "results.md").read_text()
    assert "16.76" in md and "19.41" in md and "0.07" in md
    assert md.count("## Tolerance 0.001\n") == 1 and md.count("## Tolerance 0\n") == 1
    assert md.count("### Perplexity") == 2 and md.count("### KL[p_proj") == 2  # Tables 1 and 3 at each tolerance
    assert "output layer + softmax, z from final_hidden (the paper's f)" in md
    # knnlm reproduce's rows and claims from the same metrics: one Table 1/3 row per tolerance, one claim per
    # tolerance and KL target; Table 4's ratio of gains against f_norm (like with like) and f_out, with intervals
    rows = PR.table1_rows(m, {"label": "tiny"}, out)
    assert [r[1] for r in rows["table1"]] == ["0.001", "0"] and len(rows["table3"]) == 2
    claims = PR.table1_claims(m, "tiny")
    assert len(claims) == 2 * 3 and all(c.threshold == 0.9 and c.direction == "above" for c in claims)
    for c in claims:
        check_record(c.record())
    # at tol 0 every position ran to the cap: still improving there, the share is a lower bound
    improving = m["by_tol"][1]["targets"]["f_out"]["still_improving_fraction"]
    assert 0 <= improving <= 1 and (claims[3].lower_bound != "") == (improving > PR.NOT_CONVERGED_SHARE)
    t4 = PR.table4_claims(m, "tiny")
    ratio = m["by_tol"][1]["fg_gain_over_f_gain"]  # tolerance 0: Table 4 lets every position run its steps
    assert [c.setting for c in t4] == ["tiny, vs f_norm (like with like)", "tiny, vs f_out (the paper's f)"]
    # (a ratio of two zero gains is not finite: null in results.json, NaN in the interval; NaN compares equal here)
    np.testing.assert_array_equal([c.interval.point for c in t4],
                                  [PR.Interval.from_dict(ratio[f]).point for f in ("f_norm", "f_out")])
    assert PR.table4_rows(m, {"label": "tiny"}, out)["table4"][0][-1] == PR.Interval.from_dict(ratio["f_out"]).fmt()
    # each table's claim is judged only at its own solver setting (before: a lr 0.1 run got a Table 4 verdict)
    at = lambda **solver: {**m, "solver": {**m["solver"], **solver}}  # noqa: E731
    t1_at_t4, t4_at_t4 = PR.table1_claims(at(lr=0.001, max_steps=100), "t"), PR.table4_claims(at(lr=0.001, max_steps=100), "t")
    assert all(c.not_judged.startswith("not Table 1's setting (lr 0.1; this run: lr 0.001)") for c in t1_at_t4)
    assert t4_at_t4 and not any("setting" in c.not_judged for c in t4_at_t4)
    # Table 4 reads tolerance 0 (before: the first, largest tolerance, where positions stop after a step or so)
    stopped = PR.table4_claims({**at(lr=0.001, max_steps=100), "by_tol": m["by_tol"][:1]}, "t")
    assert stopped and all(c.not_judged.startswith("not Table 4's setting (every position runs its steps: --tol 0")
                           for c in stopped)
    t4_at_t1 = PR.table4_claims(at(lr=0.1, max_steps=1000), "t")
    assert all(c.not_judged == "not Table 4's setting (lr 0.001, max_steps 100; this run: lr 0.1, max_steps 1000)"
               for c in t4_at_t1)
    assert not any("setting" in c.not_judged for c in PR.table1_claims(at(lr=0.1, max_steps=1000), "t"))
    assert not (out / "partial.npz").exists()


def _die_on_third_batch(monkeypatch):
    """The run checkpoints after every group and its process "dies" in the third batch's solve; -> the real project."""
    monkeypatch.setattr(PRUN, "_CHECKPOINT_EVERY_S", 0.0)
    real, calls = PV.project, []

    def dies_on_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(PRUN, "project", dies_on_third_batch)
    return real


def test_resume_after_kill_gives_same_results(common, tmp_path, monkeypatch, capsys):
    args = ["analyze", "projection", *common, "--block_size", "8", "--stride", "4", "--max_tokens", "16",
            "--target", "f_out", "--max_steps", "5", "--batch_size", "4",
            "--tol", "1e-2,1e-3", "--n_boot", "50"]  # groups of one window
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    real = _die_on_third_batch(monkeypatch)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 130
    assert json.loads((tmp_path / "resumed" / "partial.json").read_text())["windows_done"] == 1  # [7, 4, 4] targets
    monkeypatch.setattr(PRUN, "project", real)
    # a rerun with other settings is refused before any work: neither the killed run's records nor, below, a finished
    # run's results are replaced
    partial = (tmp_path / "resumed" / "partial.npz").read_bytes()
    assert main([*args[:-1], "60", "--output_dir", str(tmp_path / "resumed")]) == 2
    assert "holds a run with other settings (n_boot: 50 -> 60)" in capsys.readouterr().err
    assert (tmp_path / "resumed" / "partial.npz").read_bytes() == partial
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 0
    a, b = np.load(tmp_path / "whole" / "per_token.npz"), np.load(tmp_path / "resumed" / "per_token.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    results = (tmp_path / "whole" / "results.json").read_bytes()
    assert main([*args, "--max_steps", "6", "--output_dir", str(tmp_path / "whole")]) == 2
    assert "max_steps: 5 -> 6" in capsys.readouterr().err
    assert (tmp_path / "whole" / "results.json").read_bytes() == results
    assert main([*args, "--device", "cpu", "--output_dir", str(tmp_path / "whole")]) == 0  # where it runs is free


@pytest.mark.parametrize("extra, needle", [
    (["--target", "f,softmax"], "--target"),
    (["--lmbda", "1"], "--lmbda"),
    (["--lmbda", "0.25,0.5"], "--lmbda"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--tol", "1e-3,-1"], "--tol"),
    (["--patience", "-1"], "--patience"),
    (["--target", "f,f_norm"], "--target"),
])
def test_bad_input(common, tmp_path, capsys, extra, needle):
    assert main(["analyze", "projection", *common, *extra, "--output_dir", str(tmp_path / "out")]) == 2
    assert f"knnlm: error: {needle}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()



def test_a_kill_between_the_checkpoints_two_files_does_not_count_tokens_twice(common, tmp_path, monkeypatch):
    """partial.npz is written before partial.json: killed between them, the resumed run scored the windows after the
    recorded count again, on top of their saved rows (19 tokens for 15 in the review's repro)."""
    args = ["analyze", "projection", *common, "--block_size", "8", "--stride", "4", "--max_tokens", "16",
            "--target", "f_out", "--max_steps", "5", "--batch_size", "4", "--tol", "1e-2", "--n_boot", "50"]
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(PRUN, "_CHECKPOINT_EVERY_S", 0.0)
    real, calls = PRUN.atomic_write_json, []

    def dies_writing_the_second_record(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: its partial.npz is written, its partial.json not
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(PRUN, "atomic_write_json", dies_writing_the_second_record)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(PRUN, "atomic_write_json", real)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 0
    a, b = np.load(tmp_path / "whole" / "per_token.npz"), np.load(tmp_path / "resumed" / "per_token.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_positions_whose_search_finds_no_neighbour_keep_the_lm(common, tiny_lm, tmp_path):
    """An IVF index whose probed list is empty returns no neighbour (distances inf): p_knnlm is the LM there, as eval
    scores it. The projection stopped with "the LM gave non-finite log-probabilities" (p_knn was NaN)."""
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import Datastore
    from knnlm.knn import KNNArgs

    store = Datastore.open(common[common.index("--datastore") + 1])
    ivf = empty_list_ivf(store)
    corpus = CorpusArgs(validation_file=common[common.index("--validation_file") + 1])
    args = PS.ProjectionArgs(output_dir=str(tmp_path / "proj"), datastore=str(store.dir), target=["f_out"],
                             max_steps=3, tol=[0.0], n_boot=20)
    m = PRUN.run_projection(tiny_lm, corpus, args, store, KNNArgs(k=16, lmbda=[0.25]), index=ivf)
    assert m["ppl_knnlm"] == pytest.approx(m["ppl_lm"], rel=1e-6)  # no position found a neighbour: the LM
    assert m["kl_lm_knnlm"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["targets"]["f_out"]["ppl_proj"] == pytest.approx(m["ppl_lm"], rel=1e-5)  # z0 is already optimal


def test_a_resume_over_tokens_made_anew_starts_over(common, tmp_path, monkeypatch):
    """A projection killed under a reader whose tokens differ (an earlier version's) continued its records over the
    new tokens on resume (its key has the corpus settings, not the token record): rows of two tokenizations in one
    per_token.npz. It now starts over, and equals an uninterrupted run."""
    import knnlm.corpus as corpus_mod

    args = ["analyze", "projection", *common, "--block_size", "8", "--stride", "4", "--max_tokens", "16",
            "--target", "f_out", "--max_steps", "5", "--batch_size", "4", "--tol", "1e-2", "--n_boot", "50"]
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    real_encode = corpus_mod._encode_long_text

    def other_reader(*a, **kw):  # an earlier reader: other tokens under another token key
        for ids, has_text in real_encode(*a, **kw):
            yield ids[::-1].copy(), has_text

    monkeypatch.setattr(corpus_mod, "_encode_long_text", other_reader)
    monkeypatch.setattr(corpus_mod, "_reader_version", lambda source: {})
    _die_on_third_batch(monkeypatch)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 130
    monkeypatch.undo()
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 0
    a, b = np.load(tmp_path / "whole" / "per_token.npz"), np.load(tmp_path / "resumed" / "per_token.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_kill_while_the_outputs_are_written_resumes_with_nothing_to_score(common, tmp_path, monkeypatch):
    """Killed in the histograms (every window scored, results.json not yet written): the rerun scored every window
    again from the first, its checkpoint having been deleted before the plots; it now writes the same results
    without scoring anything, and a finished folder keeps no checkpoint."""
    args = ["analyze", "projection", *common, "--block_size", "8", "--stride", "4", "--max_tokens", "16",
            "--target", "f_out", "--max_steps", "5", "--batch_size", "4", "--tol", "1e-2", "--n_boot", "50"]
    assert main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    real_hist = PRUN.histogram

    def dies_in_the_plots(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(PRUN, "histogram", dies_in_the_plots)
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 130
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(PRUN, "histogram", real_hist)
    real, calls = PRUN.project, []
    monkeypatch.setattr(PRUN, "project", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert main([*args, "--output_dir", str(tmp_path / "resumed")]) == 0
    assert calls == []  # nothing scored again
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("whole", "resumed"))
    a.pop("timing"), b.pop("timing")
    assert a == b
    assert not (tmp_path / "resumed" / "partial.npz").exists() and not (tmp_path / "resumed" / "partial.json").exists()
