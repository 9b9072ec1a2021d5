"""Reports: the self-contained HTML evaluation report (Jinja2 + matplotlib figures)."""

from __future__ import annotations

from meddx.reporting.report import render_report, write_report

__all__ = ["write_report", "render_report"]
