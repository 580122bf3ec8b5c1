"""Scaling-law fitting for model families: Hoffmann et al. approach 1 (loss envelope, as in the
HunyuanVideo report) and approach 3 (parametric L(N, D)), plus a plots + markdown + JSON report.

Coefficients follow the paper's units: N_opt = a1 C^b1, D_opt = a2 C^b2 with N, D in billions of
parameters / tokens and C in PFLOPs (FLOPs / 1e15).
"""

from vidtron.recipes.scaling.envelope import PAPER_COEFFICIENTS, consistency_check, fit_envelope, recommend
from vidtron.recipes.scaling.parametric import fit_parametric
from vidtron.recipes.scaling.report import write_report

__all__ = ["PAPER_COEFFICIENTS", "consistency_check", "fit_envelope", "fit_parametric", "recommend", "write_report"]
