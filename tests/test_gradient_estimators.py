"""The score-function objective's baseline (``make_objective("score", K)``): leave-one-out needs
K >= 2, unknown baselines are refused, and the default follows K. The gradient-estimator study that
compares the estimators is tested in ``experiments/tests/test_gradient_estimators_study.py``.
"""

from __future__ import annotations

import pytest


def test_leave_one_out_needs_two_particles() -> None:
    from pyrovae.infer.objectives import make_objective

    with pytest.raises(ValueError, match="moving-average"):
        make_objective("score", 1, baseline="leave-one-out")
    with pytest.raises(ValueError, match="baseline"):
        make_objective("score", 4, baseline="mean")
    assert make_objective("score", 1).baseline == "moving-average"
    assert make_objective("score", 3).baseline == "leave-one-out"
