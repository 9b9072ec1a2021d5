"""Statistics for clinical evaluation, independent of models and data: metrics, bootstrap
confidence intervals, calibration, conformal prediction sets, operating points, subgroups and
paired tests (DeLong, McNemar).

Everything here works on arrays of targets and probabilities. The predictor applies the fitted
parts (temperature, thresholds, conformal quantiles) at prediction time, training fits them on
the calibration split, and evaluation reports them with confidence intervals.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """NaN/inf → None, numpy → Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
