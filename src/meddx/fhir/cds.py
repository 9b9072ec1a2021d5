"""The CDS Hooks adapter contract: how models of one modality answer CDS Hooks.

A :class:`CdsAdapter` says, for one modality, which FHIR data the service asks the EHR to
prefetch and how to turn that data into model inputs; the service (:mod:`meddx.serving.cds`)
does the rest (calling the model, building the card, the heat-map link, the fail-safe). Each
modality folder that offers CDS Hooks subclasses it in its ``cds.py`` and names it in its
``CDS_ADAPTERS``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CdsAdapter", "HookInput", "fit_summary", "json_digest", "resources_in", "sha256_bytes"]


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of an input, the only way an input is named in the audit log."""
    return hashlib.sha256(data).hexdigest()


def json_digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def fit_summary(text: str) -> str:
    """A card summary cut to CDS Hooks' 140 characters."""
    return text if len(text) < 140 else text[:136] + "..."


@dataclass
class HookInput:
    """What an adapter found for the model: sources for ``predictor.read`` and provenance.

    Attributes:
        sources: one entry per model input.
        digests: sha256 of each input's raw content (for the audit log).
        basis: FHIR references of the resources used (``Media/…``), for RiskAssessment.basis.
        notes: anything the card should say about the data used.
    """

    sources: list[Any]
    digests: list[str]
    basis: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def resources_in(value: Any, types: tuple[str, ...]) -> list[dict[str, Any]]:
    """Resources of ``types`` in a prefetch value (a resource or a searchset Bundle)."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        return [e["resource"] for e in value.get("entry", []) or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                and e["resource"].get("resourceType") in types]
    return [value] if value.get("resourceType") in types else []


class CdsAdapter:
    """How models of one modality answer CDS Hooks. Subclass for a new modality.

    Class attributes:
        hooks: the hooks offered (``patient-view`` and maybe ``order-select``).
        risk_assessment: offer a suggestion that records a FHIR RiskAssessment (binary risks).
        explain: run the explainer when the service explains on cards (the card links to
            the stored picture).
        link_label: the label of the card's link to that picture.
        input_noun: what the model assessed, in the card's words ("image", "ECG").
        description: the service description shown by the EHR.
    """

    hooks: tuple[str, ...] = ("patient-view",)
    risk_assessment: bool = False
    explain: bool = True
    link_label: str = "Open the input with its explanation"
    description: str = "meddx model"
    input_noun: str = "data"

    def prefetch(self, card: Any, hook: str) -> dict[str, str]:
        """Prefetch templates (key → FHIR query using only context tokens)."""
        return {"patient": "Patient/{{context.patientId}}"}

    def inputs(self, request: Any, data: dict[str, Any], card: Any) -> HookInput | None:
        """Model inputs from the (pre)fetched ``data``; None when there is nothing to assess."""
        raise NotImplementedError

    def summary(self, pred: Any, card: Any) -> str | None:
        """The card's summary in the modality's words (< 140 characters); None: the generic
        one."""
        return None

    def detail_lines(self, pred: Any, card: Any) -> list[str]:
        """Extra Markdown lines for the card's detail."""
        return []
