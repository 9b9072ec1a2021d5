"""CDS Hooks for ICU risk models: the current stay from Patient, Encounter and Observations."""

from __future__ import annotations

import re
from typing import Any

from meddx.fhir.cds import CdsAdapter, HookInput, fit_summary, json_digest

__all__ = ["EhrCdsAdapter"]

class EhrCdsAdapter(CdsAdapter):
    """An ICU stay from the Patient, the in-progress Encounter and the Observations.

    Prefetch templates may only use context tokens, so all of the patient's Observations are
    asked for; the modality's fast JSON reader keeps those inside the Encounter's window.
    """

    risk_assessment = True
    description = "risk assessment from the current ICU stay"

    def prefetch(self, card: Any, hook: str) -> dict[str, str]:
        return {"patient": "Patient/{{context.patientId}}",
                "encounter": "Encounter?patient={{context.patientId}}&status=in-progress",
                "observations": "Observation?patient={{context.patientId}}&_count=5000"}

    def inputs(self, request: Any, data: dict[str, Any], card: Any) -> HookInput | None:
        if not data.get("patient") or not data.get("encounter"):
            return None
        source = {k: data.get(k) for k in ("patient", "encounter", "observations")}
        given = request.prefetch or {}
        as_sent = all(k in given and given[k] is v for k, v in source.items())
        # all of it came in the body: hash the body rather than re-dump ~1 MB of JSON
        digest = request.body_sha256 if as_sent and request.body_sha256 else json_digest(source)
        return HookInput(sources=[source], digests=[digest])

    def summary(self, pred: Any, card: Any) -> str | None:
        """E.g. ``icu v1.0.0: in-hospital death risk 34% (high); GCS low, lactate high and
        rising`` — calibrated risk, band from the card's thresholds, risk-raising findings."""
        from meddx.modalities.ehr.fhir import risk_band

        pos = card.task.positive_class
        probs = pred.calibrated or pred.probabilities
        if not pos or pos not in probs:
            return None
        risk = float(probs[pos])
        band = risk_band(risk, card)[0]
        outcome = "in-hospital death" if pos in ("died", "death") else str(pos)
        text = f"{card.name} v{card.version}: {outcome} risk {risk:.0%} ({band})"
        drivers = [re.sub(r"\s*\([^)]*\)", "", str(f)).strip()
                   for f in (pred.notes or {}).get("findings") or []
                   if "lowers the risk" not in str(f)]
        sep = "; "
        for d in drivers:
            if len(text) + len(sep) + len(d) >= 140:
                break
            text, sep = text + sep + d, ", "
        return fit_summary(text)

    def detail_lines(self, pred: Any, card: Any) -> list[str]:
        from meddx.modalities.ehr.fhir import risk_band

        pos = card.task.positive_class
        probs = pred.calibrated or pred.probabilities
        if not pos or pos not in probs:
            return []
        band, low, high = risk_band(float(probs[pos]), card)
        return [f"Risk band **{band}** (low < {low:.0%} ≤ moderate < {high:.0%} ≤ high, from "
                "the model card's operating points)."]
