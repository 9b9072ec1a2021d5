"""``meddx monitor``: a deployed model's audit log against its training reference, by window.

Per model and per window (calendar hours/days/weeks in UTC, or every N answered inputs):
volume, errors, decisions, out-of-distribution flags; drift of the predicted risk and of the
input statistics from the package's training reference (PSI, see
:mod:`meddx.training.reference`); CDS Hooks feedback (acceptance rate with a Wilson 95% CI);
and, with outcomes joined by request id, live AUROC, Brier score and ECE with bootstrap 95% CIs.

Drift is only compared on lines answered by the very package given (same weights sha256);
lines of other versions are counted and named.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError, DataError
from meddx.monitoring.logs import (
    Answered,
    AuditData,
    Failed,
    Feedback,
    read_audit,
    read_feedback,
    read_outcomes,
)
from meddx.training.reference import (
    INPUT_STATS,
    PSI_MAJOR,
    PSI_MODERATE,
    TOP_CLASS,
    bin_counts,
    psi,
    psi_null_quantile,
    risk_from_output,
)

__all__ = ["Window", "parse_window", "drift_status", "live_performance", "analyse", "monitor"]

logger = logging.getLogger(__name__)

_ORIGIN = datetime(1970, 1, 5, tzinfo=UTC)  # a Monday: weekly windows start on Mondays
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_POSITIVE = {"1", "true", "yes", "positive", "pos"}
_NEGATIVE = {"0", "false", "no", "negative", "neg"}


@dataclass(frozen=True)
class Window:
    """How answers are grouped: ``seconds`` of calendar time, or ``count`` answers each."""

    spec: str
    seconds: int | None = None
    count: int | None = None


def parse_window(spec: str) -> Window:
    """``1d``, ``12h``, ``1w``, ``30m`` (calendar windows, UTC) or ``N`` (every N answers).

    Raises:
        ConfigError: anything else.
    """
    s = spec.strip().lower()
    if s.isdigit() and int(s) > 0:
        return Window(spec, count=int(s))
    m = re.fullmatch(r"(\d+)\s*([mhdw])", s)
    if m and int(m.group(1)) > 0:
        return Window(spec, seconds=int(m.group(1)) * _UNITS[m.group(2)])
    raise ConfigError(f"window {spec!r} is not understood",
                      hint="use e.g. 1d, 12h, 1w, or a number of answers such as 500")


def drift_status(value: float, null95: float, n: int) -> str:
    """``stable`` (PSI ≤ 0.1), ``moderate`` (0.1–0.25), ``major`` (> 0.25) — or ``noise`` when
    an unshifted window of ``n`` cases reaches that PSI by chance (95th percentile)."""
    if n == 0 or not math.isfinite(value):
        return "no data"
    if value <= PSI_MODERATE:
        return "stable"
    if math.isfinite(null95) and value <= null95:
        return "noise"
    return "major" if value > PSI_MAJOR else "moderate"


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _drift(values: Sequence[float], hist: Any, n_ref: int) -> dict[str, Any]:
    """Summary of ``values`` and, with a reference histogram, PSI and its status."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    out: dict[str, Any] = {"n": int(v.size)}
    if v.size:
        out.update(mean=float(v.mean()), p05=float(np.quantile(v, 0.05)),
                   p50=float(np.median(v)), p95=float(np.quantile(v, 0.95)))
    if hist is None or v.size == 0:
        return out
    counts = bin_counts(hist.edges, v)
    value = psi(hist.fractions, n_ref, counts)
    null95 = psi_null_quantile(hist.fractions, n_ref, int(v.size))
    out.update(psi=value, psi_null95=null95, status=drift_status(value, null95, int(v.size)),
               fractions=(counts / counts.sum()).tolist())
    if hist.std > 0:
        out["shift_sd"] = (float(v.mean()) - hist.mean) / hist.std
    return out


def _wilson(k: int, n: int) -> dict[str, float | None]:
    """``k`` of ``n`` with its Wilson 95% interval (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    if n == 0:
        return {"value": None, "low": None, "high": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": k / n, "low": float(ci.low), "high": float(ci.high)}


def _weighted_ece(y: np.ndarray, r: np.ndarray, W: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """ECE (equal-width bins, as :func:`expected_calibration_error`) under each weight row."""
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(r, edges[1:-1], right=True), 0, n_bins - 1)
    gap = np.zeros((len(r), n_bins))
    gap[np.arange(len(r)), bins] = r - y
    return np.abs(W @ gap).sum(axis=1) / W.sum(axis=1)


def live_performance(y: Sequence[int], risk: Sequence[float], n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """AUROC, Brier score and ECE of ``risk`` against 0/1 outcomes ``y``, with stratified
    percentile bootstrap 95% CIs (:mod:`meddx.statistics.bootstrap`)."""
    from meddx.statistics.bootstrap import bootstrap_metrics, resample_weights
    from meddx.statistics.calibration import expected_calibration_error, reliability_curve
    from meddx.tasks import TaskSpec

    yy = np.asarray(y, dtype=int)
    rr = np.clip(np.asarray(risk, dtype=float), 0.0, 1.0)
    out: dict[str, Any] = {"n": int(yy.size), "positives": int(yy.sum())}
    if yy.size == 0:
        return out
    task = TaskSpec(kind="binary", class_names=["negative", "positive"],
                    positive_class="positive")
    probs = np.column_stack([1 - rr, rr])
    m = bootstrap_metrics(task, yy, probs, n_resamples=n_resamples, seed=seed)
    ece = {"value": expected_calibration_error(yy, probs, positive_index=1),
           "low": float("nan"), "high": float("nan")}
    if n_resamples > 0 and yy.size > 1:
        W = resample_weights(np.arange(yy.size), yy, n_resamples, np.random.default_rng(seed))
        ece["low"], ece["high"] = (float(x) for x in
                                   np.percentile(_weighted_ece(yy, rr, W), [2.5, 97.5]))
    out.update(auroc=dict(m["auroc"]), brier=dict(m["brier"]), ece=ece,
               mean_risk=float(rr.mean()), observed_rate=float(yy.mean()),
               notes=list(m.notes),
               reliability=reliability_curve(yy, probs, n_bins=10, positive_index=1))
    return out


# ----------------------------------------------------------------- grouping
def _window_key(t: datetime, window: Window) -> datetime:
    size = window.seconds or 86400
    k = math.floor((t - _ORIGIN).total_seconds() / size)
    return _ORIGIN + timedelta(seconds=k * size)


def _assign(window: Window, answered: list[Answered], events: list[Any]
            ) -> tuple[list[datetime], list[int], list[int]]:
    """Window starts, and the window index of every answer and of every other event."""
    if window.count:
        starts = [answered[i].time for i in range(0, len(answered), window.count)]
        idx_a = [i // window.count for i in range(len(answered))]
        idx_e = [max(0, bisect_right(starts, e.time) - 1) for e in events]
        return starts, idx_a, idx_e
    keys = sorted({_window_key(x.time, window) for x in [*answered, *events]})
    pos = {k: i for i, k in enumerate(keys)}
    return (keys, [pos[_window_key(a.time, window)] for a in answered],
            [pos[_window_key(e.time, window)] for e in events])


def _outcome_value(text: str, risk_of: str, output: dict[str, Any]) -> int | None:
    t = text.strip().lower()
    if risk_of == TOP_CLASS:  # no positive class: was the top class right?
        label = output.get("label")
        return int(t == str(label).lower()) if isinstance(label, str) else None
    if t in _POSITIVE or t == risk_of.lower():
        return 1
    if t in _NEGATIVE:
        return 0
    names = {str(k).lower() for k in (output.get("probabilities") or {})}
    return 0 if t in names else None


def _join(rows: list[Answered], outcomes: list[tuple[str, int | None, str]], risk_of: str
          ) -> tuple[dict[int, int], Counter]:
    """Outcome (0/1) per answer position in ``rows``; the reasons rows did not join."""
    by_request: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(rows):
        if a.request_id:
            by_request[a.request_id].append(i)
    joined: dict[int, int] = {}
    why: Counter = Counter()
    for rid, index, text in outcomes:
        found = by_request.get(rid)
        if not found:
            why["request id not in the log (or another model)"] += 1
            continue
        if index is None and len(found) > 1:
            why["batch request without an input column"] += 1
            continue
        hits = [i for i in found if index is None or rows[i].index == index]
        if not hits:
            why["input index not in that request"] += 1
            continue
        value = _outcome_value(text, risk_of, rows[hits[0]].output)
        if value is None:
            why["outcome not understood"] += 1
        elif hits[0] in joined:
            why["duplicate outcome"] += 1
        else:
            joined[hits[0]] = value
    return joined, why


# ---------------------------------------------------------------- summaries
@dataclass
class _Model:
    """One model's lines and what it is compared against."""

    name: str
    rows: list[Answered]
    failed: list[Failed]
    feedback: list[Feedback]
    package: Any = None  # ModelPackage
    risk_of: str | None = None
    reference: Any = None  # TrainingReference

    def compared(self, a: Answered) -> bool:
        return self.package is not None and a.sha256 == self.package.sha256


def _summary(m: _Model, rows: list[Answered], failed: list[Failed], feedback: list[Feedback],
             joined: dict[int, int], index_of: dict[int, int], bootstrap: int,
             seed: int) -> dict[str, Any]:
    """Everything measured over one group of lines (a window, or all of them)."""
    requests = sum(1 for a in rows if a.index == 0)
    decisions = Counter(_decision(a.output) for a in rows)
    ood = sum(1 for a in rows if a.output.get("ood") is True)
    ood_known = sum(1 for a in rows if "ood" in a.output)
    out: dict[str, Any] = {
        "answers": len(rows), "requests": requests, "errors": len(failed),
        "error_rate": len(failed) / (requests + len(failed)) if requests + len(failed) else None,
        "errors_by_type": dict(Counter(f.error for f in failed)),
        "decisions": dict(decisions), "ood": ood, "ood_flagged_answers": ood_known,
        "ood_rate": ood / ood_known if ood_known else None,
    }
    cmp = [a for a in rows if m.compared(a)]
    ref = m.reference
    if m.risk_of is not None:
        risks = [risk_from_output(a.output, m.risk_of) for a in cmp]
        out["risk"] = _drift(risks, ref.risk if ref else None, ref.n if ref else 0)
        out["inputs"] = {k: _drift([a.stats[k] for a in cmp if a.stats and k in a.stats],
                                   ref.inputs.get(k) if ref else None,
                                   ref.n_inputs if ref else 0) for k in INPUT_STATS}
    accepted = sum(1 for f in feedback if f.outcome == "accepted")
    overridden = len(feedback) - accepted
    out["cds"] = {"cards": sum(a.cards for a in rows if a.cds), "feedback": len(feedback),
                  "accepted": accepted, "overridden": overridden,
                  "acceptance": _wilson(accepted, len(feedback)),
                  "override_reasons": dict(Counter(f.override_reason for f in feedback
                                                   if f.override_reason))}
    pairs = [(joined[index_of[id(a)]], risk_from_output(a.output, m.risk_of or ""))
             for a in cmp if index_of.get(id(a)) in joined]
    pairs = [(y, r) for y, r in pairs if r is not None]
    if pairs:
        ys, rs = zip(*pairs, strict=True)
        out["performance"] = live_performance(ys, rs, bootstrap, seed)
    return out


def _decision(output: dict[str, Any]) -> str:
    d = output.get("decision")
    if not isinstance(d, str):
        d = output.get("label")
    return d if isinstance(d, str) else "none"


def _card_auroc(card: Any) -> tuple[str, float] | None:
    for key, entry in (card.metrics or {}).items():
        if key.endswith("/test") and isinstance(entry, dict) \
                and isinstance(entry.get("auroc"), dict):
            value = _finite(entry["auroc"].get("value"))
            if value is not None:
                return key, value
    return None


def _flags(name: str, label: str, s: dict[str, Any], card: Any) -> list[str]:
    """Lines worth an operator's attention for one group of lines."""
    flags = []
    risk = s.get("risk", {})
    if risk.get("status") in ("moderate", "major"):
        flags.append(f"{name} [{label}]: predicted-risk PSI {risk['psi']:.3f} — "
                     f"{risk['status']} shift (n={risk['n']})")
    for k, d in s.get("inputs", {}).items():
        if d.get("status") in ("moderate", "major"):
            flags.append(f"{name} [{label}]: input {k} PSI {d['psi']:.3f} — {d['status']} "
                         f"shift (n={d['n']})")
    perf = s.get("performance") or {}
    ref = _card_auroc(card) if card is not None else None
    auroc = perf.get("auroc") or {}
    high = _finite(auroc.get("high"))
    if ref is not None and high is not None and high < ref[1]:
        flags.append(f"{name} [{label}]: live AUROC {auroc['value']:.3f} (95% CI up to "
                     f"{high:.3f}) below the card's {ref[0]} AUROC {ref[1]:.3f}")
    return flags


def _label(start: datetime, window: Window, k: int) -> str:
    if window.count:
        return f"#{k + 1} (from {start:%Y-%m-%d %H:%M})"
    if window.seconds and window.seconds % 86400 == 0:
        return f"{start:%Y-%m-%d}"
    return f"{start:%Y-%m-%d %H:%M}"


def _analyse_model(m: _Model, window: Window, outcomes: list[tuple[str, int | None, str]] | None,
                   bootstrap: int, seed: int) -> dict[str, Any]:
    cmp_rows = [a for a in m.rows if m.compared(a)]
    joined, why = _join(cmp_rows, outcomes or [], m.risk_of or TOP_CLASS) \
        if outcomes is not None and m.risk_of else ({}, Counter())
    index_of = {id(a): i for i, a in enumerate(cmp_rows)}
    events: list[Any] = [*m.failed, *m.feedback]
    starts, idx_a, idx_e = _assign(window, m.rows, events)
    windows = []
    card = m.package.card if m.package is not None else None
    flags: list[str] = []
    for k, start in enumerate(starts):
        rows = [a for a, i in zip(m.rows, idx_a, strict=True) if i == k]
        evs = [e for e, i in zip(events, idx_e, strict=True) if i == k]
        s = _summary(m, rows, [e for e in evs if isinstance(e, Failed)],
                     [e for e in evs if isinstance(e, Feedback)], joined, index_of,
                     bootstrap, seed)
        label = _label(start, window, k)
        windows.append({"label": label, "start": start.isoformat(), **s})
        flags += _flags(m.name, label, s, card)
    overall = _summary(m, m.rows, m.failed, m.feedback, joined, index_of, bootstrap, seed)
    flags += _flags(m.name, "all", overall, card)
    other = Counter(a.sha256 or "unknown" for a in m.rows if not m.compared(a))
    return {"name": m.name, "package": _package_info(m), "windows": windows,
            "overall": overall, "flags": flags,
            "other_versions": dict(other) if m.package is not None else {},
            "outcomes": None if outcomes is None else {
                "joined": len(joined), "not_joined": dict(why)}}


def _package_info(m: _Model) -> dict[str, Any] | None:
    if m.package is None:
        return None
    ref = m.reference
    return {"path": str(m.package.path), "version": m.package.card.version,
            "sha256": m.package.sha256, "risk_of": m.risk_of,
            "reference": None if ref is None else {
                "fitted_on": ref.fitted_on, "n": ref.n, "n_inputs": ref.n_inputs,
                "risk": ref.risk.model_dump(), "inputs": {k: h.model_dump() for k, h in
                                                          ref.inputs.items()}}}


def _service_model(service: str, models: Sequence[str]) -> str | None:
    """The model behind a CDS service id (``<model>`` or ``<model>-<hook>``)."""
    found = [n for n in models if service == n or service.startswith(n + "-")]
    return max(found, key=len) if found else None


def _models(data: AuditData, feedback: list[Feedback], packages: dict[str, Any],
            only: str | None) -> list[_Model]:
    names = sorted({a.model for a in data.answered} | {f.model for f in data.failed
                                                       if f.model})
    if only is not None:
        if only not in names:
            raise DataError(f"model '{only}' is not in the audit log",
                            hint=f"found: {', '.join(names) or 'none'}")
        names = [only]
    out = []
    for name in names:
        pkg = packages.get(name)
        m = _Model(name, [a for a in data.answered if a.model == name],
                   [f for f in data.failed if f.model == name],
                   [f for f in feedback if _service_model(f.service, names) == name], pkg)
        if pkg is not None:
            m.reference = pkg.card.reference
            task = pkg.card.task
            if task.kind != "regression":
                m.risk_of = task.positive_class or TOP_CLASS
        out.append(m)
    return out


def _notes(m: _Model, result: dict[str, Any]) -> list[str]:
    notes = []
    if m.package is None:
        notes.append(f"no package given for '{m.name}' (--package): risk drift, input drift "
                     "and live performance need its card; volumes, errors, decisions and CDS "
                     "feedback are reported")
    elif m.reference is None:
        notes.append(f"the package of '{m.name}' has no training reference (trained before "
                     "monitoring existed): drift against training cannot be computed; the "
                     "live distributions and performance are reported")
    elif m.risk_of is None:
        notes.append(f"'{m.name}' is a regression model: no risk to monitor")
    if m.package is not None and not any(m.compared(a) for a in m.rows):
        notes.append(f"no line of '{m.name}' was answered by the package given (weights "
                     f"sha256 {m.package.sha256[:12]}…): nothing to compare")
    for sha, n in result["other_versions"].items():
        notes.append(f"{n} answers of '{m.name}' came from other weights ({sha[:12]}…) and "
                     "are left out of the drift and performance figures")
    return notes


def analyse(data: AuditData, packages: Sequence[Any] = (), *, model: str | None = None,
            feedback: list[Feedback] | None = None,
            outcomes: list[tuple[str, int | None, str]] | None = None,
            window: str | Window = "1d", bootstrap: int = 1000, seed: int = 0
            ) -> dict[str, Any]:
    """Monitor every model in ``data`` (or ``model``) against its package.

    Args:
        data: the read audit log.
        packages: loaded :class:`~meddx.package.ModelPackage` objects (matched by card name).
        model: only this model.
        feedback: CDS Hooks feedback entries.
        outcomes: ``(request_id, input index or None, outcome)`` rows.
        window: see :func:`parse_window`.
        bootstrap: resamples for the CIs of live performance.
        seed: bootstrap seed.

    Returns:
        The JSON-able result (``models``, ``flags``, ``skipped`` …) that ``monitor.json`` holds.
    """
    win = window if isinstance(window, Window) else parse_window(window)
    by_name: dict[str, Any] = {}
    for p in packages:
        if p.card.name in by_name:
            raise ConfigError(f"two packages are named '{p.card.name}'")
        by_name[p.card.name] = p
    models = []
    for m in _models(data, feedback or [], by_name, model):
        result = _analyse_model(m, win, outcomes, bootstrap, seed)
        result["notes"] = _notes(m, result)
        models.append(result)
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"), "window": win.spec,
        "lines": data.lines, "answers": len(data.answered), "errors": len(data.failed),
        "other_events": data.other_events, "skipped": data.skipped.to_dict(),
        "psi_thresholds": {"moderate": PSI_MODERATE, "major": PSI_MAJOR},
        "models": models, "flags": [f for m in models for f in m["flags"]],
    }


def monitor(audit_log: str | Path, packages: Sequence[str | Path] = (), *,
            out: str | Path | None = None, model: str | None = None,
            outcomes: str | Path | None = None, feedback: str | Path | None = None,
            window: str = "1d", bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Read the logs, analyse, and write ``monitor.json`` and ``monitor.html`` into ``out``.

    ``feedback`` defaults to ``cds-feedback.jsonl`` beside the audit log when that exists
    (where the service writes it unless told otherwise).

    Raises:
        DataError: an unreadable log or outcomes file; ModelError: a bad package.
    """
    from meddx.package import load_package

    win = parse_window(window)
    data = read_audit(audit_log)
    fb_path = Path(feedback) if feedback else Path(audit_log).with_name("cds-feedback.jsonl")
    fb: list[Feedback] = []
    fb_skipped = None
    if feedback or fb_path.is_file():
        fb, fb_skipped = read_feedback(fb_path)
    rows = None
    out_skipped = None
    if outcomes is not None:
        rows, out_skipped = read_outcomes(outcomes)
    result = analyse(data, [load_package(p) for p in packages], model=model, feedback=fb,
                     outcomes=rows, window=win, bootstrap=bootstrap, seed=seed)
    result["audit_log"] = str(audit_log)
    result["feedback_log"] = str(fb_path) if fb_skipped is not None else None
    result["feedback_skipped"] = fb_skipped.to_dict() if fb_skipped is not None else None
    result["outcomes_file"] = str(outcomes) if outcomes is not None else None
    result["outcomes_rows"] = len(rows) if rows is not None else None
    result["outcomes_skipped"] = out_skipped.to_dict() if out_skipped is not None else None
    if out is not None:
        from meddx.reporting.monitor import write_monitor

        result["files"] = write_monitor(result, out)
    return result
