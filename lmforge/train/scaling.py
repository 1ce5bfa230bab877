"""Scaling laws: sweep a grid of small models × token budgets, then fit ``L(N, D) = E + A/N^α + B/D^β``.

The fit follows Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2): minimise the Huber loss (δ = 1e-3)
between ``log L`` and ``LSE(a - α log N, b - β log D, e)`` with ``A = e^a, B = e^b, E = e^e``, by BFGS (5 parameters: quasi-Newton with a dense Hessian estimate) started
from the best few points of a grid of initialisations.  Uncertainty comes from a bootstrap over the observed runs.
The compute-optimal split of a FLOP budget ``C ≈ 6 N D`` is then closed-form:
``N_opt = G (C/6)^(β/(α+β))``, ``D_opt = (C/6) / N_opt``, ``G = (α A / (β B))^(1/(α+β))``.

``N`` counts the non-embedding parameters (Kaplan et al.): at the tiny sizes a CPU can sweep, embedding tables would
otherwise dominate the count.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from lmforge.artifacts import atomic_path, write_json
from lmforge.config import StageConfig
from lmforge.progress import console

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float  # the Huber objective at the optimum
    stderr: dict[str, float] | None = None  # bootstrap standard deviation per constant

    def predict(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimum(self, flops: float) -> tuple[float, float]:
        """Compute-optimal ``(N, D)`` for a FLOP budget ``C = 6 N D``."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / 6 / n


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber(log L - LSE) summed over runs, and its gradient in ``theta = (a, b, e, alpha, beta)``."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, runs]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    lse = top + np.log(weights.sum(axis=0))
    soft = weights / weights.sum(axis=0)
    r = lse - log_l
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # dHuber/dr
    grad = np.array([
        (dr * soft[0]).sum(),
        (dr * soft[1]).sum(),
        (dr * soft[2]).sum(),
        (dr * soft[0] * -log_n).sum(),
        (dr * soft[1] * -log_d).sum(),
    ])
    return float(huber.sum()), grad


def _grid() -> np.ndarray:
    """Chinchilla's initialisation grid (coarsened): a, b ∈ 0..25, e ∈ -1..1, α, β ∈ 0..2."""
    axes = [np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5), np.arange(0, 2.01, 0.5),
            np.arange(0, 2.01, 0.5)]
    return np.array(list(itertools.product(*axes)))


def _grid_scores(grid: np.ndarray, log_n, log_d, log_l) -> np.ndarray:
    """The Huber objective of every grid row at once."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    r = np.abs(lse - log_l)
    return np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)


def _fit_theta(log_n, log_d, log_l, inits: np.ndarray, maxiter: int = 1000) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    best, best_loss = inits[0], np.inf
    for x0 in inits:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="BFGS",
                       options={"maxiter": maxiter, "gtol": 1e-10})
        if res.fun < best_loss:
            best, best_loss = res.x, float(res.fun)
    return best, best_loss


def fit_scaling_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, bootstrap: int = 100, top_inits: int = 8,
                    seed: int = 0) -> ScalingFit:
    """Fit ``L(N, D) = E + A/N^α + B/D^β`` to observed runs (parameters ``n``, tokens ``d``, final loss ``loss``)."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if not (len(n) == len(d) == len(loss)) or len(n) < 5:
        raise ValueError(f"need at least 5 runs with N, D and loss each (got {len(n)}, {len(d)}, {len(loss)})")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise ValueError("N, D and loss must all be positive")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = _grid()
    scores = _grid_scores(grid, log_n, log_d, log_l)
    inits = grid[np.argsort(scores)[:top_inits]]
    theta, best = _fit_theta(log_n, log_d, log_l, inits)

    def constants(t: np.ndarray) -> np.ndarray:
        return np.array([np.exp(t[2]), np.exp(t[0]), np.exp(t[1]), t[3], t[4]])

    stderr = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(n), len(n))
            t, _ = _fit_theta(log_n[idx], log_d[idx], log_l[idx], theta[None, :], maxiter=100)
            samples.append(constants(t))
        stderr = dict(zip(PARAMS, np.std(samples, axis=0).tolist()))
    E, A, B, alpha, beta = constants(theta)
    return ScalingFit(float(E), float(A), float(B), float(alpha), float(beta), best, stderr)


# ----------------------------------------------------------------------------------------------------------------------
# sweep


class SweepConfig(StageConfig):
    """Train a grid of small models (depths × token budgets) on one tokenizer artifact, for a scaling-law fit."""

    tokenizer: str = Field(description="Tokenizer artifact folder (tokenizer.json + tokens/).")
    depths: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], description="Model depths (layers) to train.")
    width_per_layer: int = Field(32, ge=8, description="Width = depth x this (the depth dial).")
    head_dim: int = Field(16, ge=4, description="Attention head width; heads = width / head_dim.")
    tokens: list[int] = Field(default_factory=lambda: [100_000, 200_000, 400_000],
                              description="Training-token budgets per model.")
    max_flops: float = Field(0, ge=0, description="Skip runs whose 6·N·D exceeds this (0: no limit).")
    seq_len: int = Field(64, ge=8, description="Context length of every run.")
    batch_size: int = Field(16, ge=1, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    eval_windows: int = Field(16, ge=1, description="Validation windows for the final loss.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    seed: int = Field(1337, description="Seed of every run.")


@dataclass
class SweepPoint:
    depth: int
    params: int  # non-embedding
    tokens: int
    val_loss: float
    run: str


def sweep(config: SweepConfig, out_dir: str | os.PathLike, force: bool = False) -> list[SweepPoint]:
    """Run (or skip, when done) one pretraining run per (depth, budget); write ``sweep.jsonl`` and return the points."""
    from lmforge.tokenizer.shards import read_index
    from lmforge.train import pretrain

    out = Path(out_dir)
    index = read_index(Path(config.tokenizer) / "tokens")
    points: list[SweepPoint] = []
    tokens_per_step = config.batch_size * config.seq_len
    for depth, budget in itertools.product(config.depths, config.tokens):
        width = depth * config.width_per_layer
        heads = max(1, width // config.head_dim)
        steps = max(1, budget // tokens_per_step)
        cfg = pretrain.Config(tokenizer=config.tokenizer, hidden_size=width, num_layers=depth, num_heads=heads,
                              num_kv_heads=heads, seq_len=config.seq_len, batch_size=config.batch_size,
                              max_steps=steps, warmup_steps=max(1, steps // 10), lr=config.lr, eval_every=steps,
                              eval_windows=config.eval_windows, checkpoint_every=steps, keep_checkpoints=1,
                              seed=config.seed, threads=config.threads, tensorboard=False)
        mcfg = pretrain.model_config(cfg, index["vocab_size"], index["eos_id"])
        n = mcfg.num_params() - mcfg.vocab_size * mcfg.hidden_size * (1 if mcfg.tie_word_embeddings else 2)
        d = steps * tokens_per_step
        if config.max_flops and 6 * n * d > config.max_flops:
            console.print(f"  skip depth {depth} x {d:,} tokens: 6ND = {6 * n * d:.2e} > max_flops")
            continue
        run_dir = out / f"d{depth}-t{d}"
        m = pretrain.run(cfg, run_dir, force=force)
        points.append(SweepPoint(depth, n, d, float(m.metrics["final_val_loss"]), str(run_dir)))
    if not points:
        raise ValueError("max_flops excludes every run of the sweep")
    with atomic_path(out / "sweep.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(asdict(p)) + "\n" for p in points))
    return points


def read_points(path: str | os.PathLike) -> list[SweepPoint]:
    """``sweep.jsonl`` lines (``depth, params, tokens, val_loss, run``); errors name the file and line."""
    points = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            points.append(SweepPoint(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}:{i}: not a sweep point ({err})") from None
    return points


def fit_sweep(sweep_jsonl: str | os.PathLike, out_dir: str | os.PathLike, predict: list[tuple[float, float]] = (),
              bootstrap: int = 100) -> dict:
    """Fit the sweep's points; write ``fit.json`` and ``scaling.png``; return the fit and predictions."""
    pts = read_points(sweep_jsonl)
    fit = fit_scaling_law(np.array([p.params for p in pts]), np.array([p.tokens for p in pts]),
                          np.array([p.val_loss for p in pts]), bootstrap=bootstrap)
    result = {"fit": asdict(fit), "points": len(pts),
              "predictions": [{"params": n, "tokens": d, "loss": float(fit.predict(n, d))} for n, d in predict]}
    out = Path(out_dir)
    write_json(out / "fit.json", result)
    plot_fit(pts, fit, out / "scaling.png")
    return result


def plot_fit(points: list[SweepPoint], fit: ScalingFit, out_png: str | os.PathLike) -> None:
    """Loss against tokens, one colour per model size: observed points and the fitted curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    sizes = sorted({p.params for p in points})
    d_all = np.array([p.tokens for p in points])
    grid = np.geomspace(d_all.min() / 2, d_all.max() * 4, 100)
    for i, n in enumerate(sizes):
        mine = [p for p in points if p.params == n]
        ax.plot([p.tokens for p in mine], [p.val_loss for p in mine], "o", color=f"C{i % 10}", label=f"N={n:,}")
        ax.plot(grid, fit.predict(n, grid), "-", color=f"C{i % 10}", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title(f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
