"""CDS Hooks cards from model answers.

* indicator: ``critical`` when the operating point says positive and the calibrated risk is at
  least ``critical_risk``; ``warning`` when it says positive below that, or when the conformal set
  is not a single class (refer) or disagrees with the decision (review); ``info`` otherwise. An
  uncertain answer is never shown as ``info``.
* summary (< 140 characters), Markdown detail (probabilities, decision and threshold, the
  conformal set and its coverage, the operating point's sensitivity and specificity, intended use,
  the data used), source label with the model version, a link to the heat map page, suggestions
  where meaningful (an expert review request; recording a RiskAssessment for risk models).
* an input the package's OOD detector flags (``prediction.ood``) gets an ``info`` card that says
  the case is outside what the model was trained on and why, with no probabilities, no
  decision and no suggestion (:func:`ood_card`).
"""

from __future__ import annotations

import logging
from typing import Any

from meddx.fhir.resources import MEDDX_SYSTEM, RESEARCH_NOTICE, risk_assessment, validate

__all__ = ["build_card", "ood_card", "indicator", "summary_line", "OVERRIDE_REASONS",
           "OOD_SUMMARY"]

OOD_SUMMARY = "outside what this model was trained on: no assessment"
_OOD_METHOD = {"mahalanobis": "Mahalanobis distance on the network's features",
               "energy": "energy score of the network's outputs"}

logger = logging.getLogger(__name__)

OVERRIDE_REASONS = [
    {"code": "disagree", "system": f"{MEDDX_SYSTEM}/override-reason",
     "display": "Disagree with the finding"},
    {"code": "input-unsuitable", "system": f"{MEDDX_SYSTEM}/override-reason",
     "display": "Input unsuitable (quality, wrong view or patient)"},
    {"code": "already-addressed", "system": f"{MEDDX_SYSTEM}/override-reason",
     "display": "Already known or addressed"},
]


def _risk(pred: Any) -> float | None:
    pos = pred.model.get("positive_class")
    probs = pred.calibrated or pred.probabilities
    return float(probs[pos]) if pos and pos in probs else None


def _positive(pred: Any) -> bool | None:
    pos = pred.model.get("positive_class")
    if isinstance(pred.decision, str) and pos:
        return pred.decision == pos
    return None


def indicator(pred: Any, critical_risk: float) -> str:
    """``info`` | ``warning`` | ``critical`` from the decision, calibrated risk and set."""
    positive = _positive(pred)
    risk = _risk(pred)
    if positive:
        return "critical" if risk is not None and risk >= critical_risk else "warning"
    if pred.refer or pred.review:
        return "warning"
    if positive is None and risk is not None and risk >= 0.5:
        return "warning"  # no operating point: never reassure on a high raw risk
    return "info"


def summary_line(pred: Any, card: Any) -> str:
    """At most 139 characters."""
    risk = _risk(pred)
    pos = pred.model.get("positive_class")
    if isinstance(pred.decision, str) and risk is not None:
        text = f"{card.name}: {pred.decision} (risk of {pos} {risk:.0%})"
    elif isinstance(pred.label, str):
        probs = pred.calibrated or pred.probabilities
        text = f"{card.name}: most probable {pred.label} ({probs.get(pred.label, 0):.0%})"
    else:
        text = f"{card.name}: {pred.label}"
    if pred.refer:
        text += " - uncertain, refer for review"
    elif pred.review:
        text += " - flagged for review"
    return text if len(text) < 140 else text[:136] + "..."


def _metric_line(card: Any) -> str | None:
    test = card.metrics.get("test") if isinstance(card.metrics, dict) else None
    auroc = test.get("auroc") if isinstance(test, dict) else None
    if isinstance(auroc, dict) and "value" in auroc:
        ci = auroc.get("ci") or [auroc.get("ci_low"), auroc.get("ci_high")]
        if ci and None not in ci:
            return f"Test AUROC {auroc['value']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        return f"Test AUROC {auroc['value']:.3f}"
    return None


def detail_markdown(pred: Any, card: Any, research: bool, notes: list[str],
                    extra: list[str] | None = None, risk_card: bool = False) -> str:
    """The card's Markdown detail (``extra``: the modality adapter's own lines). Risk cards
    state the risk against the alert threshold rather than a "decision" named after the
    outcome ("Decision died" reads wrongly to a clinician)."""
    lines = [f"**{RESEARCH_NOTICE.capitalize()}.**", ""] if research else []
    probs = pred.calibrated or pred.probabilities
    kind = "Calibrated probability" if pred.calibrated else "Probability (uncalibrated)"
    lines += [f"| Class | {kind} |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in probs.items()]
    lines.append("")
    # the operating point this deployment decides at (``--operating-point``), not the default
    risk, op = _risk(pred), card.operating_points.get(pred.operating_point or "")
    if isinstance(pred.decision, str) and risk_card and risk is not None:
        above = _positive(pred)
        kind = "Calibrated risk" if pred.calibrated else "Risk"
        lines.append(f"{kind} {risk:.1%} (class *{pred.model.get('positive_class')}*) is "
                     f"**{'at or above' if above else 'below'}** the alert threshold "
                     f"{pred.threshold:.1%} (operating point `{pred.operating_point}`)"
                     f"{': **alert**' if above else ''}.")
    elif isinstance(pred.decision, str):
        lines.append(f"Decision **{pred.decision}** at operating point `{pred.operating_point}` "
                     f"(threshold {pred.threshold:.3f}).")
    if isinstance(pred.decision, str) and op is not None and op.calib_sensitivity is not None:
        lines.append(f"At this threshold on the calibration split: sensitivity "
                     f"{op.calib_sensitivity:.1%}, specificity {op.calib_specificity or 0:.1%}"
                     + (f", PPV {op.calib_ppv:.1%}" if op.calib_ppv is not None else "") + ".")
    if pred.prediction_set is not None and card.conformal is not None:
        cover = 1 - card.conformal.alpha
        lines.append(f"{cover:.0%} conformal prediction set: "
                     "{" + ", ".join(pred.prediction_set) + "}.")
    if pred.refer:
        lines.append("The set is not a single class: **refer for expert review**.")
    if pred.review:
        what = "The threshold call" if risk_card and risk is not None else "Decision"
        lines.append(f"{what} and the prediction set disagree: **flagged for review**.")
    lines += extra or []
    metric = _metric_line(card)
    if metric:
        lines.append(metric + ".")
    lines += _note_lines(pred.notes or {})
    lines += notes
    lines += ["", f"Intended use: {card.intended_use}"]
    return "\n".join(lines)


# how known notes read on a card; None: not shown (internal, or said elsewhere)
_NOTE_TEXT: dict[str, Any] = {
    "hours_used": lambda v: f"Hours of data used: {v} (from ICU admission).",
    "last_observation_hours": lambda v: f"Last observation used: {float(v):.1f} h after "
                                        "admission.",
    "n_observations": lambda v: f"Observations used: {v}.",
    "ignored": lambda v: f"Items left out (unknown code, unit, outside the window …): {len(v)}."
               if v else None,
    "dropped_lines": lambda v: "Left out, by reason: " + ", ".join(
        f"{k.replace('_', ' ')} {n}" for k, n in v.get("by_reason", {}).items()) + "."
        if v and v.get("total") else None,
    "below_training_minimum": lambda v: "**Fewer hours of data than the model was trained "
                                        "with: interpret with caution.**" if v else None,
    "missing_descriptors": lambda v: "Missing: " + ", ".join(map(str, v)) + "." if v else None,
}
_NOTE_HIDDEN = {"findings", "basis", "patient", "encounter", "source_format", "n_ignored",
                "windows", "starts", "fs", "source_fs", "n_samples", "leads", "seconds"}


def _note_lines(notes: dict[str, Any]) -> list[str]:
    """What the model's notes say, in short lines (lists are counted, not dumped)."""
    out = []
    findings = notes.get("findings")
    if findings:
        out.append("Top contributing findings: " + "; ".join(map(str, findings)) + ".")
    for key, value in notes.items():
        if key in _NOTE_HIDDEN:
            continue
        if key in _NOTE_TEXT:
            line = _NOTE_TEXT[key](value)
            if line:
                out.append(line)
            continue
        label = key.replace("_", " ").capitalize()
        if isinstance(value, list | tuple | dict):
            if value:
                out.append(f"{label}: {len(value)} item(s).")
        elif isinstance(value, float):
            out.append(f"{label}: {value:.3g}.")
        else:
            out.append(f"{label}: {value}.")
    return out


def _review_suggestion(pred: Any, card: Any, subject: str | None,
                       summary: str, noun: str) -> dict[str, Any] | None:
    if not (_positive(pred) or pred.refer or pred.review) or not subject:
        return None
    request = {
        "resourceType": "ServiceRequest", "status": "draft", "intent": "proposal",
        "subject": {"reference": subject},
        "code": {"text": f"Expert review of the {noun} assessed by meddx {card.name}"},
        "reasonCode": [{"text": summary}],
    }
    validate(request)
    return {"label": f"Request expert review of this {noun}", "uuid": _uuid(),
            "isRecommended": False,
            "actions": [{"type": "create", "description": "Draft a review request",
                         "resource": request}]}


def _risk_suggestion(pred: Any, card: Any, subject: str | None, basis: list[str],
                     research: bool) -> dict[str, Any] | None:
    if not subject or not card.task.positive_class:
        return None
    ra = _modality_risk_assessment(pred, served_modality=card.modality, card=card)
    if ra is not None:
        ra["subject"] = {"reference": subject}  # the hook's patient
        validate(ra)
    else:
        ra = risk_assessment(pred, card, subject=subject, basis=basis, research_only=research)
    return {"label": "Record this risk assessment in the chart", "uuid": _uuid(),
            "isRecommended": False,
            "actions": [{"type": "create", "description": "Create a RiskAssessment",
                         "resource": ra}]}


def _modality_risk_assessment(pred: Any, served_modality: str, card: Any) -> dict | None:
    """The modality's own RiskAssessment (e.g. EHR: hours used, findings); None when the
    modality has none."""
    from meddx.errors import ConfigError
    from meddx.modalities import get_modality

    modality = get_modality(served_modality)
    if not modality.fhir_risk_assessment:
        return None
    try:
        resource = modality.to_fhir(pred, card)
    except (ConfigError, NotImplementedError):
        return None
    if not isinstance(resource, dict) or resource.get("resourceType") != "RiskAssessment":
        return None
    return resource  # validated by the caller once the subject is set


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())


def ood_card(pred: Any, served: Any, label: str, link: str | None = None) -> dict[str, Any]:
    """The card for an input outside what the model was trained on: no recommendation."""
    card, spec = served.card, served.card.ood
    trained_on = card.training_data.get("dataset") or "its training set"
    lines = [f"**{RESEARCH_NOTICE.capitalize()}.**", ""] if served.research_only else []
    lines += [
        "**This case is outside what this model was trained on.** The model makes no "
        "recommendation for it; assess it without the model.",
        "",
        f"Why: its out-of-distribution score {pred.ood_score:.4g} is above the threshold "
        f"{spec.threshold:.4g} ({_OOD_METHOD.get(spec.method, spec.method)}), set so that "
        f"{spec.false_alarm:.0%} of cases like the training data ({trained_on}) would be "
        "flagged. Typical causes: another kind of input (other organ, modality or view), "
        "another scanner or centre, or a corrupt input.",
        "", f"Intended use: {card.intended_use}"]
    out: dict[str, Any] = {
        "uuid": _uuid(), "summary": fit_card_summary(f"{card.name}: {OOD_SUMMARY}"),
        "indicator": "info", "detail": "\n".join(lines),
        "source": {"label": label, "topic": {"system": f"{MEDDX_SYSTEM}/model",
                                             "code": card.name, "display": f"meddx {card.name}"}},
        "overrideReasons": OVERRIDE_REASONS,
    }
    if link:
        out["links"] = [{"label": "Open the input as the model saw it", "url": link,
                         "type": "absolute"}]
    return out


def fit_card_summary(text: str) -> str:
    return text if len(text) < 140 else text[:136] + "..."


def build_card(pred: Any, served: Any, *, critical_risk: float, link: str | None,
               subject: str | None, notes: list[str], basis: list[str],
               risk_card: bool, summary: str | None = None,
               extra_lines: list[str] | None = None,
               link_label: str = "Open the input with its explanation",
               input_noun: str = "data") -> dict[str, Any]:
    """One CDS Hooks card for one Prediction of ``served`` (a :class:`ServedModel`).

    ``summary``, ``extra_lines``, ``link_label`` and ``input_noun`` come from the modality's
    adapter (its own words); without them the generic :func:`summary_line` is used.
    """
    card, research = served.card, served.research_only
    label = f"meddx {card.name} v{card.version}"
    if research:
        label += f" ({RESEARCH_NOTICE})"
    if getattr(pred, "ood", None) and card.ood is not None:
        return ood_card(pred, served, label, link)
    summary = summary or summary_line(pred, card)
    if len(summary) >= 140:
        summary = summary[:136] + "..."
    out: dict[str, Any] = {
        "uuid": _uuid(),
        "summary": summary,
        "indicator": indicator(pred, critical_risk),
        "detail": detail_markdown(pred, card, research, notes, extra_lines, risk_card),
        "source": {"label": label,
                   "topic": {"system": f"{MEDDX_SYSTEM}/model", "code": card.name,
                             "display": f"meddx {card.name}"}},
        "overrideReasons": OVERRIDE_REASONS,
    }
    if link:
        out["links"] = [{"label": link_label, "url": link,
                         "type": "absolute"}]
    suggestions = [s for s in (
        _risk_suggestion(pred, card, subject, basis, research) if risk_card else None,
        None if risk_card else _review_suggestion(pred, card, subject, summary, input_noun),
    ) if s is not None]
    if suggestions:
        out["suggestions"] = suggestions
        out["selectionBehavior"] = "at-most-one"
    return out
