"""Scaling-law fitter: approach 1 (envelope) and approach 3 (parametric) recover a known law, the
paper's coefficients pass the consistency check, bootstrap intervals behave, the report is written
and bad input fails with a message naming the field.

Synthetic data: Chinchilla's L(N, D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 with C = 6ND, whose
compute-optimal exponents are b1 = 0.28/0.62 = 0.4516 and b2 = 0.34/0.62 = 0.5484.
"""

import copy
import json

import numpy as np
import pytest

from vidtron.recipes.scaling import (
    PAPER_COEFFICIENTS,
    consistency_check,
    fit_envelope,
    fit_parametric,
    recommend,
    write_report,
)
from vidtron.recipes.scaling.parametric import allocation_from_law
from vidtron.recipes.scaling.synthetic import CHINCHILLA, chinchilla_curves

TRUE = allocation_from_law(CHINCHILLA["A"], CHINCHILLA["B"], CHINCHILLA["alpha"], CHINCHILLA["beta"])
B1_TRUE, B2_TRUE = TRUE["b1"], TRUE["b2"]  # 0.4516, 0.5484


@pytest.fixture(scope="module")
def dense():
    """36 sizes densely log-spaced over 1e7..1e11 params, runs from 1e6 to 1e13 tokens, no noise."""
    return chinchilla_curves(np.logspace(7, 11, 36), tokens_max=1e13, n_points=60, tokens_min=1e6)


@pytest.fixture(scope="module")
def noisy():
    """Same family with 0.3% log-normal loss noise."""
    return chinchilla_curves(np.logspace(7, 11, 36), tokens_max=1e13, n_points=60, tokens_min=1e6, noise=0.003)


# ----------------------------------------------------------------------------- 1. approach 1


@pytest.mark.parametrize("refine", [True, False])
def test_envelope_recovers_chinchilla_exponents(dense, refine):
    fit = fit_envelope(dense, refine=refine, n_boot=200)
    assert abs(fit["b1"] - B1_TRUE) < 0.02, fit["b1"]
    assert abs(fit["b2"] - B2_TRUE) < 0.02, fit["b2"]
    assert abs(fit["a1a2x6000"] - 1.0) < 0.03  # C = 6ND holds at every envelope point
    assert abs(fit["b1_plus_b2"] - 1.0) < 0.01
    assert fit["n_points"] >= 20 and len(fit["envelope"]) == fit["n_points"]
    if refine:  # the parabola vertex lands on the continuous optimum
        assert fit["a1"] == pytest.approx(TRUE["a1"], rel=0.05)
        assert fit["a2"] == pytest.approx(TRUE["a2"], rel=0.05)


def test_envelope_on_a_sparse_paper_like_family():
    """7 sizes from 92M to 6.6B (as the paper's family): refinement + edge rule still find 0.452."""
    curves = chinchilla_curves([92e6, 2e8, 5e8, 1e9, 2e9, 4e9, 6.6e9], tokens_max=2e11, n_points=40, tokens_min=1e8)
    fit = fit_envelope(curves, n_boot=200)
    assert abs(fit["b1"] - B1_TRUE) < 0.02
    assert all(not p["edge"] for p in fit["envelope"])
    kept = fit_envelope(curves, drop_edges=False, n_boot=0)  # truncated minima bias the slope
    assert abs(kept["b1"] - B1_TRUE) > abs(fit["b1"] - B1_TRUE)


# ----------------------------------------------------------------------------- 2. approach 3


def test_parametric_recovers_chinchilla_law():
    curves = chinchilla_curves(np.logspace(7, 11, 30), tokens_max=1e13, n_points=30, tokens_min=1e6, noise=0.005)
    fit = fit_parametric(curves)
    assert abs(fit["alpha"] - CHINCHILLA["alpha"]) < 0.03, fit
    assert abs(fit["beta"] - CHINCHILLA["beta"]) < 0.03, fit
    assert abs(fit["E"] - CHINCHILLA["E"]) < 0.05, fit
    assert abs(fit["exponent_n"] - B1_TRUE) < 0.02
    assert fit["exponent_n"] + fit["exponent_d"] == pytest.approx(1.0)
    assert consistency_check(fit)["a1a2x6000"] == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------- 3. paper check


def test_paper_coefficients_consistency():
    image = consistency_check(PAPER_COEFFICIENTS["image"])
    assert image["a1a2x6000"] == pytest.approx(1.0653, abs=5e-4)
    assert round(image["a1a2x6000"], 2) == 1.07
    assert image["b1_plus_b2"] == pytest.approx(0.9959, abs=1e-9)
    video = consistency_check(PAPER_COEFFICIENTS["video"])
    assert video["b1_plus_b2"] == pytest.approx(0.9907, abs=1e-9)


# ----------------------------------------------------------------------------- 4. bootstrap


def test_bootstrap_intervals(noisy):
    fit = fit_envelope(noisy, n_boot=1000, seed=0)
    lo1, hi1 = fit["b1_ci"]
    lo2, hi2 = fit["b2_ci"]
    assert lo1 < B1_TRUE < hi1 and lo2 < B2_TRUE < hi2, (fit["b1_ci"], fit["b2_ci"])
    assert fit["a1_ci"][0] < fit["a1"] < fit["a1_ci"][1]
    few = fit_envelope(noisy, n_budgets=12, n_boot=1000, seed=0)
    assert few["b1_ci"][1] - few["b1_ci"][0] > 1.3 * (hi1 - lo1)  # more envelope points, narrower interval
    assert fit_envelope(noisy, n_boot=1000, seed=0)["b1_ci"] == fit["b1_ci"]  # deterministic
    assert fit_envelope(noisy, n_boot=1000, seed=1)["b1_ci"] != fit["b1_ci"]


# ----------------------------------------------------------------------------- 5. report, recommend


def test_write_report(noisy, tmp_path):
    summary = write_report(noisy, tmp_path / "rep", budget_pflops=1e6, title="test family", n_boot=200)
    for name in ("loss_vs_compute.png", "optimal_allocation.png"):
        data = (tmp_path / "rep" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (tmp_path / "rep" / "report.md").read_text()
    for needle in ("# test family", "a1*a2*6000", "HunyuanVideo image", "Approach 3", "Recommendation"):
        assert needle in md
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report == summary
    for key in ("approach1", "approach3", "paper", "consistency", "recommendation", "plots"):
        assert key in report
    for key in ("a1", "b1", "a2", "b2", "a1_ci", "b1_ci", "a2_ci", "b2_ci", "envelope", "a1a2x6000"):
        assert key in report["approach1"]
    assert report["consistency"]["paper_image"] == consistency_check(PAPER_COEFFICIENTS["image"])
    assert report["paper"]["video"]["b2"] == 0.6289
    assert abs(report["approach3"]["alpha"] - 0.34) < 0.05


@pytest.mark.parametrize("budget", [1e3, 1e6, 1e9])
def test_recommend_spends_the_budget(dense, budget):
    fit = fit_envelope(dense, n_boot=0)
    rec = recommend(fit, budget)
    assert 6 * rec["params"] * rec["tokens"] / 1e15 == pytest.approx(budget, rel=0.03)
    assert rec["params_b"] == pytest.approx(rec["params"] / 1e9)
    truth = recommend(TRUE, budget)
    assert rec["params"] == pytest.approx(truth["params"], rel=0.1)


# ----------------------------------------------------------------------------- 6. bad input


def _good():
    return chinchilla_curves([1e8, 1e9, 1e10], tokens_max=1e12, n_points=5, tokens_min=1e8)


def _with(i, key, value):
    curves = copy.deepcopy(_good())
    curves[i][key] = value
    return curves


BAD = {
    "empty": ([], r"curves: got an empty list"),
    "not a list": ("runs.csv", r"curves: got an empty list \(or not a list\)"),
    "missing key": (
        [{k: v for k, v in c.items() if k != "tokens"} for c in _good()],
        r"curves\[0\]: missing key.*tokens",
    ),
    "length mismatch": (_with(1, "loss", [3.0, 2.9]), r"curves\[1\]: list lengths differ.*one flops, tokens and loss"),
    "negative loss": (_with(0, "loss", [3.0, -1.0, 2.0, 1.9, 1.8]), r"curves\[0\]\['loss'\]\[1\].*positive"),
    "zero params": (_with(2, "params", 0), r"curves\[2\]\['params'\].*positive"),
    "nan flops": (_with(0, "flops", [1e18, float("nan"), 3e18, 4e18, 5e18]), r"curves\[0\]\['flops'\]\[1\]"),
    "flops not increasing": (_with(0, "flops", [5e18, 4e18, 3e18, 2e18, 1e18]), r"flops'\] must increase.*sort"),
    "single size": (_good()[:1], r"got 1 model size.*at least 2.*add runs"),
    "repeated size": (_with(1, "params", 1e8), r"curves\[1\]\['params'\].*repeats curves\[0\]"),
}


@pytest.mark.parametrize("fn", [fit_envelope, fit_parametric], ids=["envelope", "parametric"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_field_and_fix(fn, case):
    curves, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        fn(curves)


def test_bad_options():
    with pytest.raises(ValueError, match="budget_pflops"):
        recommend(TRUE, -1.0)
    with pytest.raises(ValueError, match="fit: missing"):
        recommend({"a1": 1.0}, 1.0)
    with pytest.raises(ValueError, match="n_budgets"):
        fit_envelope(_good(), n_budgets=2)
    disjoint = chinchilla_curves([1e8, 1e10], tokens_max=[1e9, 1e12], n_points=5, tokens_min=[1e8, 1e11])
    with pytest.raises(ValueError, match="overlap|envelope point"):
        fit_envelope(disjoint)
