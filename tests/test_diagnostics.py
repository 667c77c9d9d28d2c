"""The Hessian-imitation diagnostics against independent computations: finite differences,
closed forms, Monte Carlo rates, hand-computed metrics, and the optimizers' own state."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from helpers.optim import tiny_mlp
from helpers.threads import single_thread
from torch import nn

from lehi.diagnostics.estimates import (
    instantaneous_estimates,
    mean_lehi_estimate,
    optimizer_curvature,
)
from lehi.diagnostics.exact import gauss_newton_diagonal, hessian_diagonal
from lehi.diagnostics.metrics import (
    agreement,
    agreement_by_layer,
    cosine,
    least_squares_scale,
    log_median_scale,
    relative_l2,
    spearman,
    within_factor,
)
from lehi.diagnostics.setups import DiagnosticCNN, get_setup
from lehi.diagnostics.trajectory import optimizer_options, trainer_config
from lehi.optim import build_optimizer

#: Tiny models: one thread is as fast alone and far faster on a CPU shared with
#: other jobs; one for the whole module.
one_thread = pytest.fixture(single_thread, autouse=True, scope="module", name="one_thread")


#: The diagnostics' model: a float64 tanh MLP 5-6-3 (exact Hessians are cheap).
SMALL = dict(d_in=5, hidden=6, d_out=3, dtype=torch.float64)


def data(loss: str, n: int = 9, d_in: int = 5, d_out: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        return x, torch.randint(0, d_out, (n,), generator=g)
    return x, torch.randn(n, d_out, generator=g, dtype=torch.float64)


def torch_loss(loss: str, out, y):
    return F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out, y)


def finite_difference_diagonal(model: nn.Module, loss: str, x, y, h: float = 1e-4):
    """Central second differences (f(w + h e) − 2 f(w) + f(w − h e)) / h², one per entry."""
    params = list(model.parameters())
    w = nn.utils.parameters_to_vector(params).detach().clone()

    def f(vec):
        nn.utils.vector_to_parameters(vec, params)
        with torch.no_grad():
            return torch_loss(loss, model(x), y).item()

    f0, out = f(w), torch.empty_like(w)
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = h
        out[i] = (f(w + e) - 2 * f0 + f(w - e)) / h**2
    nn.utils.vector_to_parameters(w, params)
    return out


def flat(diagonal: dict, model: nn.Module):
    return torch.cat([diagonal[n].reshape(-1) for n, _ in model.named_parameters()])


# ------------------------------------------------------------------------ exact diagonals
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("structured", [True, False])
def test_hessian_diagonal_matches_central_finite_differences(loss, structured):
    model = tiny_mlp(**SMALL)
    x, y = data(loss)
    exact = flat(hessian_diagonal(model, loss, x, y, structured=structured), model)
    fd = finite_difference_diagonal(model, loss, x, y)
    torch.testing.assert_close(exact, fd, atol=1e-6, rtol=1e-5)


def test_hessian_diagonal_of_a_cnn_matches_finite_differences():
    """Covers both convolution paths: conv1 entry by entry, conv2 through its output."""
    torch.manual_seed(0)
    model = DiagnosticCNN(side=4, num_classes=3, channels=(2, 3)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    exact = hessian_diagonal(model, "cross_entropy", x, y)
    plain = hessian_diagonal(model, "cross_entropy", x, y, structured=False)
    for name in exact:
        torch.testing.assert_close(exact[name], plain[name], atol=1e-12, rtol=1e-9)
    fd = finite_difference_diagonal(model, "cross_entropy", x, y)
    torch.testing.assert_close(flat(exact, model), fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gauss_newton_equals_hessian_for_a_linear_model(loss):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = data(loss, n=7, d_in=4)
    gn = gauss_newton_diagonal(model, loss, x, y)
    hess = hessian_diagonal(model, loss, x, y)
    for name in gn:
        torch.testing.assert_close(gn[name], hess[name], atol=1e-12, rtol=1e-9)
    if loss == "mse":
        # F.mse_loss over N×q entries: ∂²f/∂W_ij² = (2/(N q)) Σ_n x_nj², ∂²f/∂b_i² = 2/q.
        n, q = len(x), 3
        torch.testing.assert_close(gn["weight"], (2 / (n * q) * x.square().sum(0)).expand(3, 4))
        torch.testing.assert_close(gn["bias"], torch.full((3,), 2 / q, dtype=torch.float64))


def test_gauss_newton_equals_hessian_diagonal_for_a_relu_network():
    """Each weight enters a ReLU network linearly inside its activation region, so the
    residual term of the Hessian has a zero diagonal."""
    model = tiny_mlp(activation=nn.ReLU, **SMALL)
    x, y = data("cross_entropy")
    gn = gauss_newton_diagonal(model, "cross_entropy", x, y)
    hess = hessian_diagonal(model, "cross_entropy", x, y)
    for name in gn:
        torch.testing.assert_close(gn[name], hess[name], atol=1e-12, rtol=1e-9)


def test_gauss_newton_matches_explicit_per_example_sum():
    """(1/N) Σ_n J_nᵀ H_z J_n with J_n from a loop of backward passes and H_z = diag(p) − ppᵀ."""
    model = tiny_mlp(**SMALL)
    x, y = data("cross_entropy")
    gn = flat(gauss_newton_diagonal(model, "cross_entropy", x, y), model)
    expected = torch.zeros_like(gn)
    for i in range(len(x)):
        z = model(x[i : i + 1]).squeeze(0)
        rows = [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(z[k], model.parameters(), retain_graph=True)
                ]
            )
            for k in range(len(z))
        ]
        jac = torch.stack(rows)
        p = torch.softmax(z.detach(), 0)
        h_z = torch.diag(p) - torch.outer(p, p)
        expected += torch.einsum("ka,kl,la->a", jac, h_z, jac) / len(x)
    torch.testing.assert_close(gn, expected)


def test_per_example_methods_refuse_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(ValueError, match="BatchNorm"):
        gauss_newton_diagonal(model, "mse", x, y)
    with pytest.raises(ValueError, match="hinge"):
        hessian_diagonal(nn.Linear(4, 3), "hinge", x, y)


# --------------------------------------------------------------------------- estimates
def test_averaged_lehi_estimate_converges_to_gauss_newton_like_one_over_sqrt_draws():
    model = tiny_mlp(**{**SMALL, "d_out": 4})
    x, y = data("cross_entropy", n=12, d_out=4)
    gn = flat(gauss_newton_diagonal(model, "cross_entropy", x, y), model)
    draws = [4, 16, 64, 256]
    errors = []
    for k in draws:
        runs = [
            flat(
                mean_lehi_estimate(
                    model, "cross_entropy", x, y, torch.Generator().manual_seed(100 * k + r), k
                ),
                model,
            )
            for r in range(4)
        ]
        errors.append(np.mean([relative_l2(e, gn) for e in runs]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Monte Carlo: error ∝ draws^(-1/2), i.e. slope −0.5 on log-log axes.
    slope = np.polyfit(np.log(draws), np.log(errors), 1)[0]
    assert -0.7 < slope < -0.35, (slope, errors)
    assert errors[-1] < 0.15


def test_optimizer_states_after_one_step_equal_the_instantaneous_estimates():
    """With one refresh, each bias-corrected EMA is the first input itself, and the optimizer
    draws v from the same seeded generator as the instantaneous estimates. In float32, the
    dtype the study trains in: the optimizers' fast path draws from the loss's own gradient,
    which gives the same labels as the estimates' softmax (computed in float32) only then."""
    x, y = data("cross_entropy", n=10)
    x = x.float()
    estimates = instantaneous_estimates(
        tiny_mlp(**SMALL).float(), "cross_entropy", x, y, draws=2, seed=7
    )
    for name, key, factor in [
        ("lehi", "lehi", 1.0),
        ("lehibrid", "lehibrid", 1.0),
        ("adam", "adam", 1.0),
        ("sophia", "sophia", 1 - 0.99),
    ]:
        model = tiny_mlp(**SMALL).float()
        options = optimizer_options(name, "digits")  # the YAML config the study trains with
        opt = build_optimizer(options, model, loss="cross_entropy", ignore_index=-100, seed=7)
        out = model(x)
        loss = F.cross_entropy(out, y)
        if name == "adam":
            loss.backward()
        else:
            opt.backward(loss, out, y)
        opt.step()
        state = optimizer_curvature(opt, model, num_terms=len(x))
        for param in state:
            torch.testing.assert_close(state[param], estimates[key][param] * factor)


def test_instantaneous_estimates_relations():
    x, y = data("cross_entropy", n=10)
    model = tiny_mlp(**SMALL)
    est = instantaneous_estimates(model, "cross_entropy", x, y, draws=3, seed=3)
    for name in est["lehi"]:
        torch.testing.assert_close(
            est["lehibrid"][name], torch.maximum(est["lehi"][name], est["adam"][name])
        )
        # Sophia's ĝ is the same draw, clipped: a common factor ≤ 1 on every coordinate.
    ratio = flat(est["sophia"], model) / flat(est["lehi"], model)
    ratio = ratio[torch.isfinite(ratio)]
    assert torch.allclose(ratio, ratio[0]) and ratio[0] <= 1.0
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(
        flat(est["adam"], model), torch.cat([a.reshape(-1) for a in g]).square() * 10
    )


# ----------------------------------------------------------------------------- metrics
def test_metrics_equal_hand_computed_values():
    e = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r = torch.tensor([2.0, 2.0, 1.0, 8.0])
    # e·r = 41, ‖e‖² = 30, ‖r‖² = 73, e − r = (−1, 0, 2, −4).
    assert cosine(e, r) == pytest.approx(41 / math.sqrt(30 * 73))
    assert relative_l2(e, r) == pytest.approx(math.sqrt(21 / 73))
    # ranks e = (1, 2, 3, 4), r = (2.5, 2.5, 1, 4): centred dot 1.5, norms √5 and √4.5.
    assert spearman(e, r) == pytest.approx(1.5 / math.sqrt(5 * 4.5))
    # e/r = (0.5, 1, 3, 0.5): three of four within a factor 2.
    assert within_factor(e, r) == pytest.approx(0.75)
    assert least_squares_scale(e, r) == pytest.approx(41 / 30)
    # log(r/e) = (log 2, 0, −log 3, log 2): median (0 + log 2)/2 → scale √2.
    assert log_median_scale(e, r) == pytest.approx(math.sqrt(2))
    # √2·e / r = (0.71, 1.41, 4.24, 0.71): again three of four.
    assert agreement(e, r)["within2_fit"] == pytest.approx(0.75)


def test_metrics_edge_cases():
    # Zero references are left out of the factor-2 fraction; a negative one is never matched.
    assert within_factor([1.0, 1.0, 0.0], [0.0, -1.0, 0.0]) == 0.0
    assert within_factor([1.0, 3.0, 5.0], [0.0, 2.0, 5.0]) == 1.0
    assert math.isnan(cosine([0.0, 0.0], [1.0, 2.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="differ in size"):
        cosine([1.0], [1.0, 2.0])


def test_agreement_by_layer_groups_weight_and_bias():
    est = {
        "a.weight": torch.tensor([[1.0, 2.0]]),
        "a.bias": torch.tensor([3.0]),
        "b.weight": torch.tensor([4.0]),
    }
    ref = {
        "a.weight": torch.tensor([[2.0, 2.0]]),
        "a.bias": torch.tensor([1.0]),
        "b.weight": torch.tensor([8.0]),
    }
    out = agreement_by_layer(est, ref)
    assert set(out) == {"all", "a", "b"}
    assert out["all"] == pytest.approx(
        agreement([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 8.0]), nan_ok=True
    )
    assert out["a"]["cosine"] == pytest.approx(cosine([1.0, 2.0, 3.0], [2.0, 2.0, 1.0]))
    assert out["b"]["within2"] == 1.0 and out["b"]["rel_l2"] == pytest.approx(0.5)


# ------------------------------------------------------------------ study end to end
@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
    from lehi.diagnostics.study import StudyConfig, run_study

    root = tmp_path_factory.mktemp("results")
    config = StudyConfig(models=("digits_mlp",), optimizers=("adam", "lehi"), small=True, draws=4)
    frame = run_study(root / "diagnostics", config)
    return root, frame


def test_study_writes_tidy_rows_for_every_estimate_and_checkpoint(study_root):
    from lehi.diagnostics.study import COLUMNS

    root, frame = study_root
    on_disk = pd.read_csv(root / "diagnostics" / "diagnostics.csv")
    assert list(on_disk.columns) == list(COLUMNS)
    assert len(on_disk) == len(frame)
    assert set(on_disk["checkpoint"]) == {"init", "mid", "end"}
    assert set(on_disk["layer"]) == {"all", "net.0", "net.2", "net.4"}
    adam_end = on_disk[(on_disk["trajectory"] == "adam") & (on_disk["checkpoint"] == "end")]
    assert {
        "lehi",
        "lehi_avg",
        "lehi_per_example",
        "lehibrid",
        "sophia",
        "adam",
        "gn_other_batch",
        "gauss_newton",
        "ema_adam",
    } == set(adam_end["estimate"])
    assert "ema_adam" not in set(on_disk[on_disk["checkpoint"] == "init"]["estimate"])
    cos = on_disk[(on_disk["metric"] == "cosine") & (on_disk["layer"] == "all")]
    assert cos["value"].between(-1, 1).all()
    # A ReLU MLP: the exact Gauss–Newton diagonal is the Hessian diagonal.
    gn_vs_h = cos[cos["estimate"] == "gauss_newton"]["value"]
    assert np.allclose(gn_vs_h, 1.0, atol=1e-5)
    table = (root / "diagnostics" / "diagnostics.md").read_text(encoding="utf-8")
    assert "LEHI h, 1 draw" in table and "digits_mlp" in table


def test_study_trajectory_is_the_trainers_order_and_steps(study_root):
    """The Adam trajectory against a hand-written loop: 20 Adam steps in the trainer's batch
    order (epoch 0, seed 0) from the seed-0 initialisation, validated by hand at 0, 10, 20."""
    root, _ = study_root
    traj = pd.read_csv(root / "diagnostics" / "trajectories.csv")
    adam = traj[traj["trajectory"] == "adam"].set_index("step")
    assert list(adam.index) == [0, 10, 20] and set(adam["status"]) == {"completed"}
    bundle = get_setup("digits_mlp").bundle(None)
    torch.manual_seed(0)
    model = get_setup("digits_mlp").build_model(bundle)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def validate() -> tuple[float, float]:
        with torch.no_grad():
            pairs = [(model(x), y) for x, y in bundle.val.iter_epoch(0, 0)]
        n = sum(len(y) for _, y in pairs)
        loss = sum(F.cross_entropy(out, y, reduction="sum").item() for out, y in pairs) / n
        return loss, sum((out.argmax(-1) == y).sum().item() for out, y in pairs) / n

    batches = bundle.train.iter_epoch(0, 0)
    for step in range(21):
        if step in adam.index:
            loss, accuracy = validate()
            assert adam.loc[step, "val_loss"] == pytest.approx(loss, rel=1e-5)
            assert adam.loc[step, "val_metric"] == pytest.approx(accuracy, abs=1e-6)
        if step < 20:
            x, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert adam.loc[20, "val_loss"] < adam.loc[0, "val_loss"]


def test_study_settings_come_from_the_yaml_under_the_studys_protocol():
    config = trainer_config("digits", steps=20, threads=1)
    assert (config.max_steps, config.epochs, config.evaluations) == (20, None, 2)
    assert (config.grad_clip, config.schedule, config.precision, config.device) == (
        None,
        "constant",
        "fp32",
        "cpu",
    )
    assert config.divergence_factor == 10.0 and not config.checkpoint  # YAML; study's own
    sophia = optimizer_options("sophia", "digits")
    # lr is the study's (setups.OPTIMIZER_SETTINGS), the rest conf/optimizer/sophia.yaml's.
    assert sophia["lr"] == 1e-3 and sophia["_target_"] == "lehi.optim.SophiaG"
    assert (sophia["rho"], sophia["betas"], sophia["hessian_every"]) == (0.04, [0.965, 0.99], 10)


def test_figure_and_table_are_regenerated_from_the_csv(study_root, tmp_path):
    from lehi.diagnostics.report import write_report
    from plots.diagnostics import plot_diagnostics

    root, _ = study_root
    written = plot_diagnostics(root, tmp_path)
    names = {p.name for p in written}
    assert {"diagnostics_gauss_newton_small.png", "diagnostics_hessian_small.pdf"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    assert plot_diagnostics(tmp_path / "nothing", tmp_path) == []
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("diagnostics.csv", "trajectories.csv", "meta.json"):
        (copy / name).write_bytes((root / "diagnostics" / name).read_bytes())
    table = write_report(copy).read_text(encoding="utf-8")
    assert table == (root / "diagnostics" / "diagnostics.md").read_text(encoding="utf-8")


def test_study_rejects_unknown_names(tmp_path):
    from lehi.diagnostics.study import StudyConfig, run_study

    with pytest.raises(ValueError, match="digits_mlp"):
        run_study(tmp_path, StudyConfig(models=("mnist_resnet",)))
    with pytest.raises(ValueError, match="optimizers"):
        run_study(tmp_path, StudyConfig(models=("digits_mlp",), optimizers=("sgd",)))


def test_a_diverging_trajectory_is_recorded_and_stops(tmp_path, monkeypatch):
    from lehi.diagnostics import setups
    from lehi.diagnostics.study import StudyConfig, run_study

    monkeypatch.setitem(setups.OPTIMIZER_SETTINGS, "lehi", {"lr": 1e12})
    config = StudyConfig(models=("digits_mlp",), optimizers=("lehi",), small=True, draws=2)
    frame = run_study(tmp_path, config)
    trajectory = pd.read_csv(tmp_path / "trajectories.csv")
    assert list(trajectory["checkpoint"]) == ["init", "diverged"]
    assert trajectory["status"].iloc[-1] == "diverged"
    assert trajectory["divergence"].iloc[-1] == "non_finite"
    assert set(frame["checkpoint"]) == {"init"}
    assert "diverged" in (tmp_path / "diagnostics.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- Sophia's clipped share
@pytest.mark.parametrize("rho", [0.04, 0.5, 50.0])
def test_sophia_clipped_share_is_the_share_of_coordinates_stepping_lr(rho):
    """The diagnostic's share, read from the state, against the step actually taken: a clipped
    coordinate moves by exactly lr (no weight decay), any other by less."""
    from lehi.diagnostics.sophia_clip import clipped_share
    from lehi.optim import SophiaG, backward

    torch.manual_seed(0)
    model = tiny_mlp()
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    lr = 1e-2
    opt = SophiaG(model.parameters(), lr=lr, rho=rho, weight_decay=0.0, seed=0, hessian_every=2)
    for _ in range(3):
        opt.zero_grad()
        outputs = model(x)
        backward(opt, F.cross_entropy(outputs, y), outputs, y)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    moving, share = clipped_share(opt)
    deltas = [(p.detach() - b).abs() for p, b in zip(model.parameters(), before)]
    m = [opt.state[p]["exp_avg"] for p in model.parameters()]
    full = sum(int(((d >= lr * (1 - 1e-5)) & (mm != 0)).sum()) for d, mm in zip(deltas, m))
    assert moving == sum(int((mm != 0).sum()) for mm in m) > 0
    assert share == pytest.approx(full / moving)


def test_sophia_clip_rows_come_from_a_run_built_as_run_py_builds_it(tmp_path):
    from lehi.diagnostics.sophia_clip import COLUMNS, main

    out = tmp_path / "clip.csv"
    assert (
        main(["--out", str(out), "--experiments", "digits", "--lrs", "1e-3", "--steps", "11"]) == 0
    )
    table = pd.read_csv(out)
    assert tuple(table.columns) == COLUMNS
    assert list(table["step"]) == [1, 2, 10, 11]
    assert table["clipped_share"].between(0, 1).all()
    assert "| digits | 0.001 | 0 | 11 |" in out.with_suffix(".md").read_text()


def test_unigram_loss_by_hand():
    """Training tokens 0, 0, 1 of a 3-token vocabulary, +1 each: p = (3, 2, 1) / 6; the
    validation tokens 0 and 2 (-100 ignored) cost (ln 2 + ln 6) / 2 nats."""
    from lehi.diagnostics.unigram import token_counts, unigram_loss

    train = token_counts([torch.tensor([[0, 0], [1, -100]])], 3)
    val = token_counts([torch.tensor([0]), torch.tensor([2, -100])], 3)
    row = unigram_loss(train, val, alpha=1.0)
    assert row["unigram_val_loss"] == pytest.approx((math.log(2) + math.log(6)) / 2, rel=1e-12)
    assert (row["train_tokens"], row["val_tokens"], row["unseen_vocabulary"]) == (3, 2, 1)
    assert row["uniform_val_loss"] == math.log(3)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        unigram_loss(train, val, alpha=0.0)


@pytest.mark.skipif(not (SHARED_DATA / "ptb").is_dir(), reason="shared PTB not available")
def test_unigram_of_ptb_small_counts_its_whole_budget(tmp_path):
    """ptb_small's budget is one epoch of 20 × 35 targets a step: 1,327 steps, 928,900 tokens;
    the unigram model lies between the data's own validation entropy and ln V."""
    from lehi.data import ptb
    from lehi.diagnostics.unigram import main

    out = tmp_path / "unigram.csv"
    args = ["--out", str(out), "--experiments", "ptb_small", "--data-dir", str(SHARED_DATA)]
    assert main(args) == 0
    (row,) = pd.read_csv(out).to_dict("records")
    assert (row["vocabulary"], row["train_tokens"]) == (10_000, 1_327 * 20 * 35)
    _, ids = ptb.load_corpus(SHARED_DATA)
    freq = torch.bincount(ids["valid"], minlength=10_000).double()
    freq = freq[freq > 0] / freq.sum()
    entropy = float(-(freq * freq.log()).sum())  # the best any unigram model can do
    assert entropy < row["unigram_val_loss"] < math.log(10_000)
    assert "| ptb_small | 10,000 | 928,900 |" in out.with_suffix(".md").read_text()
