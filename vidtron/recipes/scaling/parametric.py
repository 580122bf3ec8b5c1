"""Hoffmann et al. approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to every checkpoint.

Units: N in parameters and D in tokens, raw (not billions), so A and B carry those units
(Chinchilla: A = 406.4, B = 410.7 with N in parameters, D in tokens).

Fit: minimise the mean Huber loss (delta 1e-3) between log L and the LSE-parameterised prediction

    log L_hat = LSE(a - alpha log N, b - beta log D, e),    A = e^a, B = e^b, E = e^e,

with L-BFGS-B and an analytic gradient. Internally log N and log D are centred on their means
(a' = a - alpha mean(log N)), which decorrelates a from alpha and makes L-BFGS converge; results
are mapped back. Initialisation: the paper's grid (alpha, beta in {0, 0.5, .., 2}, e in
{-1, -0.5, .., 1}, a, b in {0, 5, .., 25}, 4,500 points) is scored in one vectorised pass and the
best ``n_starts`` are optimised (the paper optimises from every grid point; the best few reach the
same minimum at a fraction of the cost).

Compute-optimal allocation under C = 6 N D:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

import itertools

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from vidtron.recipes.scaling.envelope import BILLION, PFLOP, validate_curves

HUBER_DELTA = 1e-3  # Hoffmann et al.


def _grid() -> np.ndarray:
    """The paper's initialisation grid as rows (a, b, e, alpha, beta). Shape (4500, 5)."""
    exps = np.arange(0.0, 2.01, 0.5)  # alpha, beta
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.01, 5.0)  # a, b
    return np.array(list(itertools.product(abs_, abs_, es, exps, exps)))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Elementwise Huber loss of residuals r."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r**2, delta * (ar - 0.5 * delta))


def _objective(theta: np.ndarray, xn: np.ndarray, xd: np.ndarray, log_l: np.ndarray, delta: float):
    """Mean Huber loss and its gradient for theta = (a', b', e, alpha, beta) on centred xn, xd of shape (P,)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * xn, b - beta * xd, np.full_like(xn, e)])  # (3, P)
    pred = logsumexp(terms, axis=0)  # (P,)
    w = np.exp(terms - pred)  # (3, P) softmax weights = d pred / d term
    r = pred - log_l  # (P,)
    g = np.clip(r, -delta, delta) / r.size  # (P,) d mean-Huber / d pred
    grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ xn, -(g * w[1]) @ xd])
    return float(_huber(r, delta).mean()), grad


def _score_grid(grid: np.ndarray, xn, xd, log_l, delta: float, chunk: int = 256) -> np.ndarray:
    """Mean Huber loss of every grid row (theta in centred form). Shape (G,)."""
    scores = []
    for rows in np.array_split(grid, max(1, len(grid) // chunk)):
        a, b, e, alpha, beta = (rows[:, j : j + 1] for j in range(5))  # each (g, 1)
        terms = np.stack([a - alpha * xn, b - beta * xd, np.broadcast_to(e, (len(rows), xn.size))])  # (3, g, P)
        pred = logsumexp(terms, axis=0)  # (g, P)
        scores.append(_huber(pred - log_l, delta).mean(axis=1))
    return np.concatenate(scores)


def allocation_from_law(A: float, B: float, alpha: float, beta: float) -> dict:
    """Compute-optimal allocation of L = E + A/N^alpha + B/D^beta under C = 6 N D.

    Returns the exponents, G, and ``a1, b1, a2, b2`` in the paper's units (N, D in billions, C in
    PFLOPs), so ``recommend`` works on the result. For Chinchilla b1 = 0.452, b2 = 0.548.
    """
    s = alpha + beta
    if alpha <= 0 or beta <= 0:
        raise ValueError(
            f"alpha = {alpha:.4g}, beta = {beta:.4g}: both must be positive for a compute-optimal allocation"
        )
    b1, b2 = beta / s, alpha / s
    g = (alpha * A / (beta * B)) ** (1.0 / s)
    c_raw_per_pflop_6 = PFLOP / 6.0  # C_raw / 6 = C_pflops * 1e15 / 6
    return {
        "G": g,
        "a1": g * c_raw_per_pflop_6**b1 / BILLION,
        "b1": b1,
        "a2": c_raw_per_pflop_6**b2 / (g * BILLION),
        "b2": b2,
    }


def _data(curves) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All checkpoints as natural-log arrays (log N, log D, log L), each of shape (P,)."""
    runs = validate_curves(curves, min_sizes=2)
    log_n = np.concatenate([np.full(r.loss.size, np.log(r.params)) for r in runs])
    log_d = np.concatenate([np.log(r.tokens) for r in runs])
    log_l = np.concatenate([np.log(r.loss) for r in runs])
    if log_l.size < 5:
        raise ValueError(f"curves: {log_l.size} checkpoints in all; the 5-parameter fit needs at least 5")
    return log_n, log_d, log_l


def fit_parametric(curves, *, delta: float = HUBER_DELTA, n_starts: int = 8) -> dict:
    """Hoffmann approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta with a Huber loss on log L.

    Args:
        curves: same format as ``fit_envelope``; every checkpoint (N, tokens, loss) is one data point.
        delta: Huber threshold on log-loss residuals (paper: 1e-3).
        n_starts: how many of the best initialisation-grid points L-BFGS-B starts from.

    Returns:
        dict with ``E, A, B, alpha, beta`` (N in parameters, D in tokens), the allocation exponents
        ``exponent_n = beta/(alpha+beta)`` and ``exponent_d = alpha/(alpha+beta)``, ``a1, b1, a2, b2``
        in the paper's units (see ``allocation_from_law``; None if alpha or beta <= 0), ``huber``
        (final mean loss), ``n_points`` and ``converged``.
    """
    if delta <= 0 or n_starts < 1:
        raise ValueError(f"delta = {delta}, n_starts = {n_starts}: need delta > 0 (e.g. 1e-3) and n_starts >= 1")
    log_n, log_d, log_l = _data(curves)
    mn, md = log_n.mean(), log_d.mean()
    xn, xd = log_n - mn, log_d - md  # centred, (P,)
    grid = _grid()
    grid[:, 0] -= grid[:, 3] * mn  # a' = a - alpha mean(log N)
    grid[:, 1] -= grid[:, 4] * md
    best = grid[np.argsort(_score_grid(grid, xn, xd, log_l, delta))[:n_starts]]
    opts = {"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12}
    results = [
        minimize(_objective, x0, args=(xn, xd, log_l, delta), jac=True, method="L-BFGS-B", options=opts) for x0 in best
    ]
    res = min(results, key=lambda r: r.fun)
    a_c, b_c, e, alpha, beta = (float(v) for v in res.x)
    a, b = a_c + alpha * mn, b_c + beta * md
    fit = {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}
    fit = {k: float(v) for k, v in fit.items()}
    fit.update(_allocation_or_none(fit))
    fit.update({"huber": float(res.fun), "n_points": int(log_l.size), "converged": bool(res.success)})
    fit["units"] = "N in parameters, D in tokens (raw); a1..b2 with N, D in billions and C in PFLOPs"
    return fit


def _allocation_or_none(fit: dict) -> dict:
    """Allocation exponents and paper-unit coefficients; None values when alpha or beta <= 0."""
    alpha, beta = fit["alpha"], fit["beta"]
    if alpha <= 0 or beta <= 0:
        return {k: None for k in ("exponent_n", "exponent_d", "G", "a1", "b1", "a2", "b2")}
    alloc = allocation_from_law(fit["A"], fit["B"], alpha, beta)
    return {"exponent_n": beta / (alpha + beta), "exponent_d": alpha / (alpha + beta), **alloc}
