"""Clinical evaluation: metrics with bootstrap CIs, operating points, calibration, conformal
prediction sets, subgroups and paired model comparison.

``evaluate(model, dataset=…, split="test", out=DIR)`` runs all of it on a packaged model and
writes the report; ``fit_post_hoc(package, bundle, eval_config)`` fits temperature, operating
points and conformal sets on the calibration split (the trainer calls it after training).
Names are imported on first use so that ``import meddx.statistics.calibration`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "evaluate",
    "fit_post_hoc",
    "EvaluationResult",
    "compute_metrics",
    "bootstrap_metrics",
    "ThresholdSelector",
    "subgroup_analysis",
    "delong_test",
    "mcnemar_test",
    "compare_models",
]

_WHERE = {
    "evaluate": "meddx.evaluation.evaluator",
    "EvaluationResult": "meddx.evaluation.evaluator",
    "fit_post_hoc": "meddx.training.posthoc",
    "compute_metrics": "meddx.statistics.metrics",
    "bootstrap_metrics": "meddx.statistics.bootstrap",
    "ThresholdSelector": "meddx.statistics.operating_points",
    "subgroup_analysis": "meddx.statistics.subgroups",
    "delong_test": "meddx.statistics.compare",
    "mcnemar_test": "meddx.statistics.compare",
    "compare_models": "meddx.evaluation.comparison",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'meddx.evaluation' has no attribute '{name}'")
