"""The goodput model (vidtron/tools/goodput.py): the Young-Daly interval is the best one, and the restart budget it
reports reaches the target exactly."""

from __future__ import annotations

import math

import pytest

from vidtron.tools.goodput import HOUR, main, young_daly


def _goodput(tau: float, stall: float, restart: float, m: float) -> float:
    return 1 - stall / tau - (tau / 2 + restart) / m


def test_young_daly_interval_maximises_goodput():
    g = young_daly(4096, 50_000, 0.1, 60)
    m = 50_000 * HOUR / 4096
    assert g.system_mtbf_s == pytest.approx(m)
    best = _goodput(g.interval_s, 0.1, 60, m)
    assert g.goodput == pytest.approx(best)
    assert all(_goodput(g.interval_s * f, 0.1, 60, m) < best for f in (0.5, 0.9, 1.1, 2.0))


def test_restart_budget_reaches_the_target_exactly():
    g = young_daly(2048, 50_000, 0.1, 0)
    budget = g.max_restart_s_for[0.995]
    assert budget > 0
    assert young_daly(2048, 50_000, 0.1, budget).goodput == pytest.approx(0.995)
    assert young_daly(2048, 50_000, 0.1, 1.5 * budget).goodput < 0.995
    assert math.isclose(g.interval_s, math.sqrt(2 * 0.1 * g.system_mtbf_s))


def test_cli_prints_the_table_and_bad_input_fails(capsys, tmp_path):
    assert main(["--gpus", "256,4096", "--ckpt-stall-s", "0.1", "--restart-s", "15"]) == 0
    assert "| 4096 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mtbf_gpu_h > 0"):
        young_daly(8, 0, 1, 1)
