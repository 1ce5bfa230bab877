"""Scaling laws: the fitter recovers known constants; the iso-FLOP optimum is the true minimum; a tiny real sweep."""

import json

import numpy as np
import pydoc_data.topics
import pytest

from lmforge.tokenizer import stage as tok_stage
from lmforge.train.scaling import ScalingFit, SweepConfig, fit_scaling_law, fit_sweep, read_points, sweep

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e7, 1e9, 6), 5)
    d = np.tile(np.geomspace(1e9, 1e11, 5), 6)
    truth = ScalingFit(**CHINCHILLA, loss=0.0)
    return n, d, truth.predict(n, d) * np.exp(rng.normal(0, noise, len(n)))


def test_fit_recovers_known_constants_from_synthetic_points():
    fit = fit_scaling_law(*synthetic(noise=0.0), bootstrap=0)
    for k, v in CHINCHILLA.items():
        assert getattr(fit, k) == pytest.approx(v, rel=2e-3), k


def test_fit_with_noise_and_bootstrap_uncertainty():
    fit = fit_scaling_law(*synthetic(noise=0.002), bootstrap=30)
    assert fit.alpha == pytest.approx(0.34, abs=0.02) and fit.beta == pytest.approx(0.28, abs=0.02)
    assert fit.E == pytest.approx(1.69, abs=0.06)
    assert set(fit.stderr) == {"E", "A", "B", "alpha", "beta"} and all(v > 0 for v in fit.stderr.values())
    assert fit.stderr["alpha"] < 0.03  # a tight grid of runs pins the exponents down


def test_a_robust_fit_ignores_one_outlier():
    n, d, loss = synthetic(noise=0.0)
    loss[7] *= 1.5  # a diverged run
    fit = fit_scaling_law(n, d, loss, bootstrap=0)
    assert fit.alpha == pytest.approx(0.34, abs=0.01) and fit.E == pytest.approx(1.69, rel=0.01)


def test_iso_flop_optimum_is_the_minimum_along_the_budget():
    fit = ScalingFit(**CHINCHILLA, loss=0.0)
    c = 1e21
    n_opt, d_opt = fit.optimum(c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    ns = np.geomspace(n_opt / 10, n_opt * 10, 2001)
    losses = fit.predict(ns, c / 6 / ns)
    assert ns[np.argmin(losses)] == pytest.approx(n_opt, rel=0.01)


def test_fit_needs_enough_valid_points():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_scaling_law([1e6, 1e7], [1e9, 1e9], [3.0, 2.9])
    with pytest.raises(ValueError, match="positive"):
        fit_scaling_law([1e6] * 5, [1e9] * 5, [3.0, 2.9, 0.0, 2.0, 2.0])


def test_sweep_trains_a_grid_and_fit_writes_a_plot(tmp_path):
    with open(tmp_path / "docs.jsonl", "w") as f:
        for key, text in sorted(pydoc_data.topics.topics.items()):
            f.write(json.dumps({"id": key, "text": text}) + "\n")
    tok_stage.run(tok_stage.Config(data=str(tmp_path / "docs.jsonl"), vocab_size=400, val_fraction=0.1),
                  tmp_path / "tok")
    cfg = SweepConfig(tokenizer=str(tmp_path / "tok"), depths=[1, 2], tokens=[512, 1024, 2048], seq_len=32,
                      batch_size=4, lr=1e-2, eval_windows=4, threads=1)
    points = sweep(cfg, tmp_path / "sweep")
    assert len(points) == 6 and {p.tokens for p in points} == {512, 1024, 2048}
    assert read_points(tmp_path / "sweep" / "sweep.jsonl") == points
    small = sorted((p for p in points if p.depth == 1), key=lambda p: p.tokens)
    assert small[-1].val_loss < small[0].val_loss  # more tokens, lower loss
    result = fit_sweep(tmp_path / "sweep" / "sweep.jsonl", tmp_path / "fit", predict=[(1e6, 1e7)], bootstrap=5)
    assert result["points"] == 6 and result["predictions"][0]["loss"] > 0
    assert (tmp_path / "fit" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    limited = sweep(cfg.model_copy(update={"max_flops": 6 * points[0].params * 1024}), tmp_path / "sweep")
    assert all(6 * p.params * p.tokens <= 6 * points[0].params * 1024 for p in limited)
