"""Hoffmann et al. approach 1 (as in the HunyuanVideo report): compute-optimal N and D from the
lower envelope of loss vs. compute.

Units. Input curves are raw: ``params`` in parameters, ``flops`` in FLOPs (cumulative training
compute at each checkpoint), ``tokens`` (cumulative). Fitted coefficients are in the paper's
units: N and D in billions, C in PFLOPs (C_pflops = flops / 1e15), for

    N_opt = a1 * C^b1,    D_opt = a2 * C^b2.

Method (``fit_envelope``):
1. Budget grid: ``n_budgets`` log-spaced C from the second-smallest run start to the
   second-largest run end (the span where two or more model sizes can reach C). Budgets that
   fewer than two runs actually cover are skipped.
2. At each C every run that covers C gets its loss and tokens by log-log interpolation along the
   run; runs that do not cover C are excluded there. The lowest loss is the envelope point:
   N_opt = that model's N, D_opt = its tokens at C.
3. Edge rule (``drop_edges``, default on): a minimum at the smallest or largest model covering C
   is dropped. There the optimum may lie beyond the family, or beyond where the runs start or
   end, and keeping it biases the slope towards flat.
4. Refinement (``refine``, default on; good for discrete families): a parabola of loss vs.
   log10 N through the minimum and its two neighbours; its vertex, clamped to the neighbours, is
   N_opt. D_opt is interpolated in log N between the neighbours' tokens at C, which keeps N * D
   consistent with the runs' own compute accounting (exact when C = 6 N D).
5. Least squares in log10: log10 N_opt = log10 a1 + b1 log10 C, likewise D. Confidence
   intervals come from a seeded pairs bootstrap over envelope points (N and D resampled
   jointly), percentile method.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

REQUIRED_KEYS = ("params", "flops", "tokens", "loss")
PFLOP = 1e15  # FLOPs per PFLOP
BILLION = 1e9  # parameters (tokens) per billion

# HunyuanVideo report, N_opt = a1 C^b1, D_opt = a2 C^b2 (N, D in billions, C in PFLOPs).
PAPER_COEFFICIENTS = {
    "image": {"a1": 5.48e-4, "b1": 0.5634, "a2": 0.324, "b2": 0.4325},
    "video": {"a1": 0.0189, "b1": 0.3618, "a2": 0.0108, "b2": 0.6289},
}


@dataclass(frozen=True)
class Run:
    """One model size's training run after validation. Arrays are float64 of shape (P,), P checkpoints."""

    params: float  # N, parameters
    flops: np.ndarray  # cumulative FLOPs, strictly increasing
    tokens: np.ndarray  # cumulative tokens
    loss: np.ndarray  # loss at each checkpoint


# ----------------------------------------------------------------------------- validation


def _positive_array(i: int, key: str, value) -> np.ndarray:
    """curves[i][key] as a 1-D float array of positive finite values, else ValueError."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"curves[{i}]['{key}']: not a list of numbers ({err}); pass a list of floats") from None
    if arr.ndim != 1:
        raise ValueError(
            f"curves[{i}]['{key}']: expected a flat list, got shape {arr.shape}; pass one value per checkpoint"
        )
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"curves[{i}]['{key}'][{j}] = {arr[j]!r}: must be positive and finite (the fit works in log space); "
            "drop that checkpoint or fix its value"
        )
    return arr


def _positive_scalar(i: int, value) -> float:
    """curves[i]['params'] as a positive finite float, else ValueError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"curves[{i}]['params'] = {value!r}: must be one number (parameter count N)") from None
    if not np.isfinite(x) or x <= 0:
        raise ValueError(f"curves[{i}]['params'] = {value!r}: must be positive and finite (parameter count N)")
    return x


def _validate_curve(i: int, curve) -> Run:
    """One curve dict -> Run, with a ValueError naming the field and the fix on bad input."""
    if not isinstance(curve, Mapping):
        raise ValueError(f"curves[{i}]: expected a dict with keys {list(REQUIRED_KEYS)}, got {type(curve).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in curve]
    if missing:
        raise ValueError(
            f"curves[{i}]: missing key(s) {missing}; each curve needs 'params' (a number) and "
            "equal-length lists 'flops', 'tokens', 'loss'"
        )
    params = _positive_scalar(i, curve["params"])
    arrays = {k: _positive_array(i, k, curve[k]) for k in ("flops", "tokens", "loss")}
    lengths = {k: int(a.size) for k, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"curves[{i}]: list lengths differ {lengths}; give one flops, tokens and loss value per checkpoint"
        )
    if lengths["flops"] < 2:
        raise ValueError(
            f"curves[{i}]: has {lengths['flops']} checkpoint(s); need at least 2 per run to interpolate along it"
        )
    steps = np.diff(arrays["flops"])
    if np.any(steps <= 0):
        j = int(np.flatnonzero(steps <= 0)[0])
        raise ValueError(
            f"curves[{i}]['flops'] must increase strictly along the run (index {j}: {arrays['flops'][j]:.4g} -> "
            f"{arrays['flops'][j + 1]:.4g}); sort the checkpoints by step and drop repeats"
        )
    return Run(params=params, **arrays)


def validate_curves(curves, min_sizes: int = 2) -> list[Run]:
    """Check a list of curve dicts and return Runs sorted by params.

    Raises ValueError naming the field and the fix for: an empty or non-list input, missing keys,
    lists of different lengths, non-positive or non-finite values, non-increasing flops, repeated
    model sizes and fewer than ``min_sizes`` model sizes.
    """
    if not isinstance(curves, list | tuple) or len(curves) == 0:
        raise ValueError(
            "curves: got an empty list (or not a list); pass one dict per model size: "
            "{'params': N, 'flops': [...], 'tokens': [...], 'loss': [...]}"
        )
    runs = [_validate_curve(i, c) for i, c in enumerate(curves)]
    seen: dict[float, int] = {}
    for i, run in enumerate(runs):
        if run.params in seen:
            raise ValueError(
                f"curves[{i}]['params'] = {run.params:.4g} repeats curves[{seen[run.params]}]; "
                "give one run per model size (merge or drop the duplicate)"
            )
        seen[run.params] = i
    if len(runs) < min_sizes:
        raise ValueError(
            f"curves: got {len(runs)} model size(s); the envelope needs at least {min_sizes} distinct sizes "
            "(a family of models trained at the same resolution); add runs of other sizes"
        )
    return sorted(runs, key=lambda r: r.params)


# ----------------------------------------------------------------------------- envelope


def budget_grid(runs: list[Run], n_budgets: int) -> np.ndarray:
    """log10 of ``n_budgets`` compute budgets (FLOPs) spanning where two or more runs can reach C. Shape (n_budgets,)."""
    starts = sorted(float(np.log10(r.flops[0])) for r in runs)
    ends = sorted(float(np.log10(r.flops[-1])) for r in runs)
    lo, hi = starts[1], ends[-2]
    if lo >= hi:
        raise ValueError(
            f"curves: no compute range is reached by two or more model sizes (runs start at >= {10**lo:.3g} FLOPs "
            f"but end by {10**hi:.3g}); extend the runs so their flops overlap"
        )
    return np.linspace(lo, hi, n_budgets)


def _at_compute(run: Run, log_c: float) -> tuple[float, float] | None:
    """(loss, log10 tokens) of ``run`` at compute 10**log_c by log-log interpolation; None if the run misses C."""
    log_f = np.log10(run.flops)
    if log_c < log_f[0] or log_c > log_f[-1]:
        return None
    loss = 10 ** np.interp(log_c, log_f, np.log10(run.loss))
    log_tokens = np.interp(log_c, log_f, np.log10(run.tokens))
    return float(loss), float(log_tokens)


def _parabola_vertex(x: np.ndarray, y: np.ndarray) -> float:
    """Vertex of the parabola through 3 points (x sorted), clamped to [x0, x2]; the middle x if not convex."""
    c2, c1, _ = np.polyfit(x, y, 2)
    if c2 <= 0:
        return float(x[1])
    return float(np.clip(-c1 / (2 * c2), x[0], x[2]))


def _envelope_point(runs: list[Run], log_c: float, refine: bool, drop_edges: bool) -> dict | None:
    """Envelope point at compute 10**log_c, or None (fewer than 2 runs cover C, or an edge minimum is dropped)."""
    covering = [(run, hit) for run in runs if (hit := _at_compute(run, log_c)) is not None]
    if len(covering) < 2:
        return None
    log_n = np.log10([run.params for run, _ in covering])  # (M,) ascending
    loss = np.array([hit[0] for _, hit in covering])  # (M,)
    log_d = np.array([hit[1] for _, hit in covering])  # (M,)
    k = int(np.argmin(loss))
    edge = k == 0 or k == len(covering) - 1
    if edge and drop_edges:
        return None
    x_n, x_d = float(log_n[k]), float(log_d[k])
    if refine and not edge:
        x_n = _parabola_vertex(log_n[k - 1 : k + 2], loss[k - 1 : k + 2])
        x_d = float(np.interp(x_n, log_n[k - 1 : k + 2], log_d[k - 1 : k + 2]))
    return {
        "compute_pflops": 10**log_c / PFLOP,
        "params": 10**x_n,
        "tokens": 10**x_d,
        "params_b": 10**x_n / BILLION,
        "tokens_b": 10**x_d / BILLION,
        "loss": float(loss[k]),
        "model_params": float(10 ** log_n[k]),
        "edge": edge,
    }


def envelope_points(runs: list[Run], n_budgets: int = 50, refine: bool = True, drop_edges: bool = True) -> list[dict]:
    """Envelope points (one dict per kept budget) over the log-spaced budget grid; see the module docstring."""
    points = [_envelope_point(runs, log_c, refine, drop_edges) for log_c in budget_grid(runs, n_budgets)]
    return [p for p in points if p is not None]


# ----------------------------------------------------------------------------- power-law fit


def power_fit(log_c: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """Least squares log10 y = log10 a + b log10 C on arrays of shape (n,); returns (log10 a, b)."""
    b, log_a = np.polyfit(log_c, log_y, 1)
    return float(log_a), float(b)


def bootstrap_fits(log_c: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, n_boot: int, seed: int) -> dict:
    """Pairs bootstrap of both power fits, resampling envelope points jointly.

    Returns arrays of shape (S,), S <= n_boot (resamples with a single distinct C are discarded):
    ``log10_a1``, ``b1``, ``log10_a2``, ``b2``.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, log_c.size, size=(n_boot, log_c.size))  # (S, n)
    x = log_c[idx]  # (S, n)
    xc = x - x.mean(axis=1, keepdims=True)
    var = (xc**2).sum(axis=1)  # (S,)
    keep = var > 1e-12
    out = {}
    for name, y in (("1", log_n), ("2", log_d)):
        yy = y[idx]  # (S, n)
        slope = (xc * (yy - yy.mean(axis=1, keepdims=True))).sum(axis=1)[keep] / var[keep]
        out[f"b{name}"] = slope
        out[f"log10_a{name}"] = yy.mean(axis=1)[keep] - slope * x.mean(axis=1)[keep]
    return out


def _percentile_ci(samples: np.ndarray, ci: float) -> list[float]:
    """Central ``ci`` percentile interval [lo, hi] of a 1-D sample."""
    lo, hi = np.percentile(samples, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(lo), float(hi)]


def consistency_check(coeffs: Mapping) -> dict:
    """With C = 6 N D (paper units: C[PFLOPs] = 6000 N[B] D[B]) a1 * a2 * 6000 ~ 1 and b1 + b2 ~ 1.

    Returns ``{"a1a2x6000": a1 * a2 * 6000, "b1_plus_b2": b1 + b2}``; the paper's image fit gives
    1.065 and 0.9959.
    """
    return {"a1a2x6000": float(coeffs["a1"] * coeffs["a2"] * 6000.0), "b1_plus_b2": float(coeffs["b1"] + coeffs["b2"])}


def _check_options(n_budgets: int, n_boot: int, ci: float) -> None:
    """ValueError for out-of-range fit options."""
    if int(n_budgets) < 3:
        raise ValueError(f"n_budgets = {n_budgets}: need at least 3 compute budgets; use e.g. 50")
    if int(n_boot) < 0:
        raise ValueError(f"n_boot = {n_boot}: must be >= 0 (0 skips the bootstrap intervals)")
    if not 0 < ci < 1:
        raise ValueError(f"ci = {ci}: must be in (0, 1), e.g. 0.95")


def fit_envelope(
    curves,
    *,
    n_budgets: int = 50,
    refine: bool = True,
    drop_edges: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """Hoffmann approach 1: fit N_opt = a1 C^b1 and D_opt = a2 C^b2 from the loss envelope.

    Args:
        curves: one dict per model size, ``{"params": N, "flops": [...], "tokens": [...], "loss": [...]}``
            with raw units (parameters, cumulative FLOPs, cumulative tokens); lists of equal length.
        n_budgets: number of log-spaced compute budgets in the grid.
        refine: parabola refinement of N_opt around the discrete minimum (see module docstring).
        drop_edges: drop budgets whose minimum is the smallest or largest model covering them.
        n_boot: bootstrap resamples for the intervals (0 skips them; the ``*_ci`` values are then None).
        seed: bootstrap seed; the same seed gives the same intervals.
        ci: confidence level of the intervals.

    Returns:
        dict with ``a1, b1, a2, b2`` (N, D in billions; C in PFLOPs), ``a1_ci, b1_ci, a2_ci, b2_ci``
        ([lo, hi]), ``n_points``, ``envelope`` (list of point dicts), ``a1a2x6000``, ``b1_plus_b2``,
        ``r2_n``, ``r2_d`` and the ``method`` options used.
    """
    _check_options(n_budgets, n_boot, ci)
    runs = validate_curves(curves, min_sizes=2)
    points = envelope_points(runs, int(n_budgets), refine, drop_edges)
    if len(points) < 3:
        raise ValueError(
            f"curves: only {len(points)} envelope point(s) (need 3) from {len(runs)} model sizes; add model sizes "
            "or longer, overlapping runs, or pass drop_edges=False to keep minima at the family's edge"
        )
    log_c = np.log10([p["compute_pflops"] for p in points])  # (n,)
    log_n = np.log10([p["params_b"] for p in points])  # (n,)
    log_d = np.log10([p["tokens_b"] for p in points])  # (n,)
    log_a1, b1 = power_fit(log_c, log_n)
    log_a2, b2 = power_fit(log_c, log_d)
    fit = {"a1": 10**log_a1, "b1": b1, "a2": 10**log_a2, "b2": b2}
    fit.update(_intervals(log_c, log_n, log_d, int(n_boot), seed, ci))
    fit.update(consistency_check(fit))
    fit["r2_n"] = _r2(log_c, log_n, log_a1, b1)
    fit["r2_d"] = _r2(log_c, log_d, log_a2, b2)
    fit["n_points"] = len(points)
    fit["n_sizes"] = len(runs)
    fit["envelope"] = points
    fit["method"] = {"n_budgets": int(n_budgets), "refine": refine, "drop_edges": drop_edges, "n_boot": int(n_boot)}
    fit["method"].update({"seed": seed, "ci": ci})
    return fit


def _intervals(log_c, log_n, log_d, n_boot: int, seed: int, ci: float) -> dict:
    """Bootstrap intervals for a1, b1, a2, b2 (None when n_boot is 0)."""
    if n_boot == 0:
        return {k: None for k in ("a1_ci", "b1_ci", "a2_ci", "b2_ci")}
    boot = bootstrap_fits(log_c, log_n, log_d, n_boot, seed)
    out = {f"b{i}_ci": _percentile_ci(boot[f"b{i}"], ci) for i in (1, 2)}
    for i in (1, 2):
        out[f"a{i}_ci"] = [10**v for v in _percentile_ci(boot[f"log10_a{i}"], ci)]
    return out


def _r2(x: np.ndarray, y: np.ndarray, log_a: float, b: float) -> float:
    """Coefficient of determination of the line log_a + b x on (x, y)."""
    ss_res = float(((y - (log_a + b * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def recommend(fit: Mapping, budget_pflops: float) -> dict:
    """Compute-optimal model size and token count for a budget, from any fit with a1, b1, a2, b2.

    Args:
        fit: output of ``fit_envelope`` or ``fit_parametric`` (or ``PAPER_COEFFICIENTS[...]``).
        budget_pflops: training compute in PFLOPs (FLOPs / 1e15).

    Returns:
        ``{"params", "tokens"}`` raw, ``{"params_b", "tokens_b"}`` in billions, ``budget_pflops`` and
        ``compute_6nd_pflops`` = 6 N D / 1e15 (close to the budget when the fit is consistent).
    """
    missing = [k for k in ("a1", "b1", "a2", "b2") if k not in fit]
    if missing:
        raise ValueError(f"fit: missing {missing}; pass the dict returned by fit_envelope or fit_parametric")
    try:
        c = float(budget_pflops)
    except (TypeError, ValueError):
        raise ValueError(f"budget_pflops = {budget_pflops!r}: must be a number of PFLOPs (FLOPs / 1e15)") from None
    if not np.isfinite(c) or c <= 0:
        raise ValueError(f"budget_pflops = {budget_pflops!r}: must be positive and finite (PFLOPs = FLOPs / 1e15)")
    params_b = float(fit["a1"] * c ** fit["b1"])
    tokens_b = float(fit["a2"] * c ** fit["b2"])
    return {
        "budget_pflops": c,
        "params": params_b * BILLION,
        "tokens": tokens_b * BILLION,
        "params_b": params_b,
        "tokens_b": tokens_b,
        "compute_6nd_pflops": 6.0 * params_b * tokens_b * BILLION**2 / PFLOP,
    }
