"""Monitoring a deployed model from what the service logged (``meddx monitor``).

The service side (Prometheus ``/metrics``, request ids, per-request input statistics in the
audit log) lives in :mod:`meddx.serving`; the training reference in
:mod:`meddx.training.reference`.
"""

from __future__ import annotations

from meddx.monitoring.analysis import analyse, monitor, parse_window

__all__ = ["analyse", "monitor", "parse_window"]
