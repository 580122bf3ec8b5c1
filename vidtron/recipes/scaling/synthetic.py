"""Synthetic loss curves from a known law L(N, D) = E + A / N^alpha + B / D^beta, for tests and demos.

Each run of a model of N parameters has checkpoints at log-spaced token counts D; its loss there
is L(N, D) (times log-normal noise if asked) and its compute is flops = 6 N D. With Chinchilla's
constants (the defaults) approach 1 should recover N_opt ~ C^(beta/(alpha+beta)) = C^0.452 and
D_opt ~ C^0.548; approach 3 should recover the constants themselves.
"""

import numpy as np

# Hoffmann et al. (2022), approach 3 fit; N in parameters, D in tokens.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(params, tokens, E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28):
    """L(N, D) = E + A / N^alpha + B / D^beta for N = params, D = tokens (broadcasting arrays)."""
    return E + A / np.power(params, alpha) + B / np.power(tokens, beta)


def _per_size(name: str, value, n_sizes: int) -> np.ndarray:
    """A scalar or one value per size, as a positive float array of shape (n_sizes,)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n_sizes, float(arr))
    elif arr.shape != (n_sizes,):
        raise ValueError(f"{name}: got {arr.size} values for {n_sizes} sizes; pass one number or one per size")
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} = {value!r}: must be positive and finite")
    return arr


def chinchilla_curves(
    sizes,
    tokens_max,
    n_points,
    E=1.69,
    A=406.4,
    B=410.7,
    alpha=0.34,
    beta=0.28,
    noise=0.0,
    seed=0,
    *,
    tokens_min=None,
) -> list[dict]:
    """Loss curves of a model family trained on the law L(N, D), in ``fit_envelope``'s input format.

    Args:
        sizes: model sizes N in parameters, shape (S,).
        tokens_max: tokens at the end of each run; one number or one per size.
        n_points: checkpoints per run, log-spaced in tokens from ``tokens_min`` to ``tokens_max``.
        E, A, B, alpha, beta: the law (defaults: Chinchilla, N in parameters, D in tokens).
        noise: std of multiplicative log-normal noise on the loss (0.01 ~ 1%), i.i.d. per checkpoint.
        seed: noise seed.
        tokens_min: tokens at the first checkpoint; one number or one per size (default tokens_max / 1e5).

    Returns:
        one dict per size: ``{"params": N, "flops": [...], "tokens": [...], "loss": [...]}`` with flops = 6 N D.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if sizes.size == 0 or not np.all(np.isfinite(sizes) & (sizes > 0)):
        raise ValueError(f"sizes = {sizes.tolist()}: need at least one positive parameter count")
    if int(n_points) < 2:
        raise ValueError(f"n_points = {n_points}: need at least 2 checkpoints per run")
    if noise < 0:
        raise ValueError(f"noise = {noise}: must be >= 0 (std of log-normal loss noise)")
    t_max = _per_size("tokens_max", tokens_max, sizes.size)
    t_min = _per_size("tokens_min", t_max / 1e5 if tokens_min is None else tokens_min, sizes.size)
    if np.any(t_min >= t_max):
        raise ValueError("tokens_min must be below tokens_max for every size")
    rng = np.random.default_rng(seed)
    curves = []
    for n, lo, hi in zip(sizes, t_min, t_max):
        tokens = np.logspace(np.log10(lo), np.log10(hi), int(n_points))  # (P,)
        loss = chinchilla_loss(n, tokens, E, A, B, alpha, beta) * np.exp(noise * rng.standard_normal(tokens.size))
        curves.append(
            {"params": float(n), "flops": (6.0 * n * tokens).tolist(), "tokens": tokens.tolist(), "loss": loss.tolist()}
        )
    return curves
