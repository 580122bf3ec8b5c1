"""Scaling-law report: two PNG plots, ``report.md`` and ``report.json`` for a family of loss curves.

Plots (log-log, C in PFLOPs):
1. ``loss_vs_compute.png``: loss vs. compute per model size, coloured by log10 N, with the
   envelope points (approach 1) in black.
2. ``optimal_allocation.png``: N_opt vs. C and D_opt vs. C, envelope points, the fitted power law
   with its bootstrap band, the approach-3 allocation (dashed) and the recommended budget (star).
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vidtron.recipes.scaling.envelope import (  # noqa: E402
    PAPER_COEFFICIENTS,
    PFLOP,
    bootstrap_fits,
    consistency_check,
    fit_envelope,
    recommend,
    validate_curves,
)
from vidtron.recipes.scaling.parametric import fit_parametric  # noqa: E402

COEFFS = ("a1", "b1", "a2", "b2")


# ----------------------------------------------------------------------------- plots


def plot_loss_vs_compute(curves, env: dict, path: Path, title: str) -> None:
    """Loss vs. compute (PFLOPs) per model size on log-log axes, envelope highlighted."""
    runs = validate_curves(curves)
    log_n = np.log10([r.params for r in runs])
    norm = matplotlib.colors.Normalize(vmin=log_n.min(), vmax=log_n.max())
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for run, ln in zip(runs, log_n):
        ax.plot(run.flops / PFLOP, run.loss, color=plt.cm.viridis(norm(ln)), lw=1.0, alpha=0.8)
    pts = env["envelope"]
    ax.plot([p["compute_pflops"] for p in pts], [p["loss"] for p in pts], "k.-", lw=1.5, ms=5, label="envelope")
    ax.set(xscale="log", yscale="log", xlabel="compute C [PFLOPs]", ylabel="loss", title=f"{title}: loss vs. compute")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="log10 params")
    ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _band(boot: dict, idx: str, log_c: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise bootstrap band of 10**(log10 a + b log10 C) over C; each of shape (len(log_c),)."""
    pred = boot[f"log10_a{idx}"][:, None] + boot[f"b{idx}"][:, None] * log_c[None, :]  # (S, K)
    lo, hi = np.percentile(pred, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return 10**lo, 10**hi


def plot_allocation(env: dict, par: dict | None, rec: dict | None, path: Path, title: str) -> None:
    """N_opt and D_opt vs. C (PFLOPs): envelope points, fit, bootstrap band, approach 3, recommendation."""
    pts = env["envelope"]
    c = np.array([p["compute_pflops"] for p in pts])  # (n,)
    c_hi = max(c.max(), rec["budget_pflops"]) if rec else c.max()
    log_grid = np.linspace(np.log10(c.min()), np.log10(c_hi), 100)  # (K,)
    boot = None
    if env["method"]["n_boot"] > 0:
        logs = [np.log10([p[k] for p in pts]) for k in ("compute_pflops", "params_b", "tokens_b")]
        boot = bootstrap_fits(*logs, env["method"]["n_boot"], env["method"]["seed"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, idx, key, label in (
        (axes[0], "1", "params_b", "N_opt [B params]"),
        (axes[1], "2", "tokens_b", "D_opt [B tokens]"),
    ):
        a, b = env[f"a{idx}"], env[f"b{idx}"]
        ax.plot(c, [p[key] for p in pts], "o", ms=4, color="C0", label="envelope")
        ax.plot(10**log_grid, a * (10**log_grid) ** b, "C0-", label=f"fit: {a:.3g} C^{b:.3f}")
        if boot is not None:
            lo, hi = _band(boot, idx, log_grid, env["method"]["ci"])
            ax.fill_between(10**log_grid, lo, hi, color="C0", alpha=0.2, label=f"{env['method']['ci']:.0%} bootstrap")
        if par is not None and par.get(f"a{idx}") is not None:
            pa, pb = par[f"a{idx}"], par[f"b{idx}"]
            ax.plot(10**log_grid, pa * (10**log_grid) ** pb, "C3--", label=f"approach 3: C^{pb:.3f}")
        if rec is not None:
            ax.plot([rec["budget_pflops"]], [rec[key]], "*", ms=14, color="C1", label="recommendation")
        ax.set(xscale="log", yscale="log", xlabel="compute C [PFLOPs]", ylabel=label)
        ax.grid(True, which="both", alpha=0.2)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: compute-optimal allocation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables


def _fmt(x) -> str:
    """Number for a markdown cell ('-' for None)."""
    return "-" if x is None else f"{x:.4g}"


def _ci(x) -> str:
    """Interval [lo, hi] for a markdown cell."""
    return "-" if x is None else f"[{x[0]:.4g}, {x[1]:.4g}]"


def _comparison_rows(env: dict, par: dict | None) -> list[str]:
    """Markdown rows: ours (approach 1, approach 3) vs. the paper's image and video fits."""
    rows = [("ours, approach 1", env)]
    if par is not None and par.get("a1") is not None:
        rows.append(("ours, approach 3", par))
    rows += [(f"HunyuanVideo {name}", coeffs) for name, coeffs in PAPER_COEFFICIENTS.items()]
    lines = ["| fit | a1 | b1 | a2 | b2 | a1*a2*6000 | b1+b2 |", "|---|---|---|---|---|---|---|"]
    for name, f in rows:
        cc = consistency_check(f)
        cells = [_fmt(f[k]) for k in COEFFS] + [f"{cc['a1a2x6000']:.4g}", f"{cc['b1_plus_b2']:.4g}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _md_approach1(env: dict) -> list[str]:
    """Markdown section: approach-1 coefficients, intervals, fit quality and method."""
    m = env["method"]
    lines = ["## Approach 1 (loss envelope, as HunyuanVideo)", ""]
    lines += ["N_opt = a1 C^b1, D_opt = a2 C^b2; N, D in billions, C in PFLOPs.", ""]
    lines += [f"| coefficient | value | {m['ci']:.0%} bootstrap interval |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(env[k])} | {_ci(env[k + '_ci'])} |" for k in COEFFS]
    lines += [
        "",
        f"R^2: N {env['r2_n']:.4f}, D {env['r2_d']:.4f}. Consistency (C = 6ND): "
        f"a1*a2*6000 = {env['a1a2x6000']:.4g}, b1+b2 = {env['b1_plus_b2']:.4g}.",
        "",
        f"Method: {m['n_budgets']} log-spaced budgets where >= 2 runs reach C; log-log interpolation along each run; "
        f"parabola refinement {'on' if m['refine'] else 'off'}; edge minima {'dropped' if m['drop_edges'] else 'kept'}; "
        f"pairs bootstrap over envelope points, {m['n_boot']} resamples, seed {m['seed']}.",
        "",
    ]
    return lines


def _md_approach3(par: dict) -> list[str]:
    """Markdown section: approach-3 parameters and implied allocation exponents."""
    lines = ["## Approach 3 (L(N, D) = E + A/N^alpha + B/D^beta; N in parameters, D in tokens)", ""]
    if "error" in par:
        return lines + [f"Not fitted: {par['error']}", ""]
    keys = ("E", "A", "B", "alpha", "beta", "exponent_n", "exponent_d")
    lines += ["| E | A | B | alpha | beta | N_opt exponent | D_opt exponent |", "|---|---|---|---|---|---|---|"]
    return lines + ["| " + " | ".join(_fmt(par[k]) for k in keys) + " |", ""]


def _md_recommendation(rec: dict | None) -> list[str]:
    """Markdown section: the recommended N and D for the budget (empty without a budget)."""
    if rec is None:
        return []
    return [
        f"## Recommendation for {rec['budget_pflops']:.4g} PFLOPs (approach 1)",
        "",
        f"N = {rec['params_b']:.4g} B params, D = {rec['tokens_b']:.4g} B tokens "
        f"(6ND = {rec['compute_6nd_pflops']:.4g} PFLOPs).",
        "",
    ]


def _markdown(summary: dict) -> str:
    """The whole report as markdown."""
    env, par = summary["approach1"], summary["approach3"]
    lines = [f"# {summary['title']}", "", f"{env['n_sizes']} model sizes, {env['n_points']} envelope points.", ""]
    lines += _md_approach1(env) + _md_approach3(par)
    lines += ["## Ours vs. the paper", ""] + _comparison_rows(env, None if "error" in par else par) + [""]
    lines += _md_recommendation(summary["recommendation"])
    lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in summary["plots"]] + [""]
    return "\n".join(lines)


def _jsonable(x):
    """Recursively convert numpy scalars/arrays and non-finite floats for json.dump."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ----------------------------------------------------------------------------- entry point


def write_report(
    curves,
    out_dir,
    budget_pflops: float | None = None,
    title: str = "vidtron scaling law",
    **envelope_options,
) -> dict:
    """Fit approaches 1 and 3 and write the plots, ``report.md`` and ``report.json`` into ``out_dir``.

    Args:
        curves: one dict per model size (see ``fit_envelope``).
        out_dir: folder to write into (created if missing).
        budget_pflops: compute budget in PFLOPs for a recommendation (None: no recommendation).
        title: report title.
        **envelope_options: passed to ``fit_envelope`` (n_budgets, refine, drop_edges, n_boot, seed, ci).

    Returns:
        the summary written to ``report.json``: ``approach1``, ``approach3`` (or ``{"error": ...}``),
        ``paper``, ``consistency``, ``recommendation``, ``plots`` and ``files``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = fit_envelope(curves, **envelope_options)
    try:
        par = fit_parametric(curves)
    except ValueError as err:  # approach 3 is a cross-check; approach 1 still reports
        par = {"error": str(err)}
    rec = recommend(env, budget_pflops) if budget_pflops is not None else None
    plots = [out / "loss_vs_compute.png", out / "optimal_allocation.png"]
    plot_loss_vs_compute(curves, env, plots[0], title)
    plot_allocation(env, None if "error" in par else par, rec, plots[1], title)
    consistency = {"ours": consistency_check(env)} | {
        f"paper_{k}": consistency_check(v) for k, v in PAPER_COEFFICIENTS.items()
    }
    summary = {
        "title": title,
        "approach1": env,
        "approach3": par,
        "paper": PAPER_COEFFICIENTS,
        "consistency": consistency,
        "recommendation": rec,
        "plots": [str(p) for p in plots],
        "files": {"markdown": str(out / "report.md"), "json": str(out / "report.json")},
    }
    summary = _jsonable(summary)
    (out / "report.md").write_text(_markdown(summary))
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
