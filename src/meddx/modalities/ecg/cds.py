"""CDS Hooks for ECG models: the patient's latest waveform Observation."""

from __future__ import annotations

from typing import Any

from meddx.fhir.cds import CdsAdapter, HookInput, fit_summary, json_digest

__all__ = ["EcgCdsAdapter"]

class EcgCdsAdapter(CdsAdapter):
    """The patient's latest ECG waveform Observation (``valueSampledData``)."""

    description = "rhythm analysis of the patient's latest ECG"
    input_noun = "ECG"
    link_label = "Open the ECG trace with its attribution strip"

    def prefetch(self, card: Any, hook: str) -> dict[str, str]:
        from meddx.modalities.ecg.fhir import PREFETCH_QUERY

        return {"ecg": PREFETCH_QUERY}

    def inputs(self, request: Any, data: dict[str, Any], card: Any) -> HookInput | None:
        from meddx.modalities.ecg.fhir import latest_waveform

        obs = latest_waveform(data.get("ecg"))
        if obs is None:
            return None
        when = str(obs.get("effectiveDateTime") or obs.get("issued") or "")[:16]
        return HookInput(sources=[obs], digests=[json_digest(obs)],
                         basis=[f"Observation/{obs['id']}"] if obs.get("id") else [],
                         notes=["ECG: the latest waveform Observation" +
                                (f" ({when})" if when else "")])

    def summary(self, pred: Any, card: Any) -> str | None:
        """E.g. ``af v1.0.0: atrial fibrillation likely (AF 72%, threshold 28%)``."""
        pos = card.task.positive_class
        probs = pred.calibrated or pred.probabilities
        if not pos or pos not in probs:
            return None
        name = _rhythm_name(pos)
        head = f"{card.name} v{card.version}: "
        p, short = float(probs[pos]), pos.upper() if len(pos) <= 3 else pos
        if isinstance(pred.decision, str):
            verdict = "likely" if pred.decision == pos else "not detected"
            cut = f", threshold {pred.threshold:.0%}" if pred.threshold is not None else ""
            text = f"{name} {verdict} ({short} {p:.0%}{cut})"
        else:
            text = f"{name} probability {p:.0%}"
        if pred.label != pos and isinstance(pred.label, str):
            text += f"; most probable: {_rhythm_name(pred.label)} ({probs[pred.label]:.0%})"
        if pred.refer or pred.review:
            text += "; uncertain, refer for review"
        return fit_summary(head + text)

    def detail_lines(self, pred: Any, card: Any) -> list[str]:
        notes = pred.notes or {}
        parts = []
        if notes.get("seconds") is not None:
            parts.append(f"{float(notes['seconds']):.0f} s")
        if notes.get("leads"):
            parts.append("lead(s) " + ", ".join(map(str, notes["leads"])))
        if notes.get("source_fs") and notes.get("fs"):
            parts.append(f"{float(notes['source_fs']):g} Hz resampled to {float(notes['fs']):g} Hz")
        return ["Record assessed: " + ", ".join(parts) + "."] if parts else []



def _rhythm_name(label: str) -> str:
    return {"af": "atrial fibrillation", "a": "atrial fibrillation", "n": "normal rhythm",
            "normal": "normal rhythm", "o": "other rhythm", "other": "other rhythm",
            "~": "noisy recording", "noisy": "noisy recording"}.get(label.lower(), label)
