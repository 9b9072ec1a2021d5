"""CDS Hooks 2.0: services, prefetch, cards, feedback — and the per-modality adapters.

One ``patient-view`` service per package (plus ``order-select`` where the modality's adapter
offers it). A :class:`CdsAdapter` says, for one modality, which FHIR data the service asks the
EHR to prefetch and how to turn that data into model inputs; the rest (calling the model,
building the card, the heat-map link, the fail-safe) is shared. Adapters are looked up in
:data:`CDS_ADAPTERS` by modality name; the ECG and EHR modalities add theirs with one line.

Fail-safe: anything that goes wrong after the request is authenticated and its data is
available ends in an answer with **no card** (and a log line saying why) — never a reassuring one.
A missing prefetch that cannot be fetched from ``fhirServer`` is a ``412``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from meddx.errors import DataError, ServingError
from meddx.registry import Registry
from meddx.serving.audit import sha256_bytes
from meddx.serving.fhir import attachment_from_resource

__all__ = [
    "CDS_ADAPTERS",
    "CdsAdapter",
    "ImageCdsAdapter",
    "EcgCdsAdapter",
    "EhrCdsAdapter",
    "HookRequest",
    "HookInput",
    "FeedbackRequest",
    "FeedbackStore",
    "PrefetchMissingError",
    "adapter_for",
    "ensure_input",
    "fetch_missing",
    "render_template",
    "resources_in",
    "response_schema",
    "validate_response",
]

logger = logging.getLogger(__name__)

CDS_ADAPTERS: Registry[type] = Registry("CDS Hooks adapter")
CDS_ADAPTERS.register("image", "meddx.serving.cds:ImageCdsAdapter")
CDS_ADAPTERS.register("ecg", "meddx.serving.cds:EcgCdsAdapter")
CDS_ADAPTERS.register("ehr", "meddx.serving.cds:EhrCdsAdapter")


class PrefetchMissingError(ServingError):
    """Prefetched data is absent and the FHIR server cannot be reached (HTTP 412)."""

    status_code = 412


# ------------------------------------------------------------------ requests
class HookRequest(BaseModel):
    """The body of a CDS Hooks 2.0 service call (fields the spec defines; others ignored)."""

    model_config = ConfigDict(extra="allow")

    hook: str
    hookInstance: str
    context: dict[str, Any]
    fhirServer: str | None = None
    fhirAuthorization: dict[str, Any] | None = None
    prefetch: dict[str, Any] | None = None
    _body_sha256: str | None = PrivateAttr(None)

    @property
    def body_sha256(self) -> str | None:
        """sha256 of the raw request body, when the service parsed it (for the audit log)."""
        return self._body_sha256

    @body_sha256.setter
    def body_sha256(self, value: str) -> None:
        self._body_sha256 = value


class _Coding(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str
    system: str | None = None
    display: str | None = None


class _OverrideReason(BaseModel):
    model_config = ConfigDict(extra="allow")
    reason: _Coding | None = None
    userComment: str | None = None


class _Feedback(BaseModel):
    model_config = ConfigDict(extra="allow")
    card: str
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[dict[str, Any]] = Field(default_factory=list)
    overrideReason: _OverrideReason | None = None
    outcomeTimestamp: str


class FeedbackRequest(BaseModel):
    """``POST /cds-services/{id}/feedback`` body (CDS Hooks 2.0)."""

    model_config = ConfigDict(extra="allow")
    feedback: list[_Feedback]


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


_TOKEN = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")


def render_template(template: str, request: HookRequest) -> str:
    """Fill ``{{context.patientId}}``-style tokens of a prefetch template from the request."""

    def value(match: re.Match[str]) -> str:
        path = match.group(1).split(".")
        cur: Any = request.model_dump()
        for part in path:
            if not isinstance(cur, dict) or part not in cur:
                raise PrefetchMissingError(f"prefetch token {match.group(0)} cannot be filled")
            cur = cur[part]
        return str(cur)

    return _TOKEN.sub(value, template)


def resources_in(value: Any, types: tuple[str, ...]) -> list[dict[str, Any]]:
    """Resources of ``types`` in a prefetch value (a resource or a searchset Bundle)."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        return [e["resource"] for e in value.get("entry", []) or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                and e["resource"].get("resourceType") in types]
    return [value] if value.get("resourceType") in types else []


# ------------------------------------------------------------------- adapters
class CdsAdapter:
    """How models of one modality answer CDS Hooks. Subclass for a new modality.

    Class attributes:
        hooks: the hooks offered (``patient-view`` and maybe ``order-select``).
        risk_assessment: offer a suggestion that records a FHIR RiskAssessment (binary risks).
        explain: run the explainer when the service explains on cards (the card links to
            the stored picture).
        link_label: the label of the card's link to that picture.
        description: the service description shown by the EHR.
    """

    hooks: tuple[str, ...] = ("patient-view",)
    risk_assessment: bool = False
    explain: bool = True
    link_label: str = "Open the image with its heat map"
    description: str = "meddx model"

    def prefetch(self, card: Any, hook: str) -> dict[str, str]:
        """Prefetch templates (key → FHIR query using only context tokens)."""
        return {"patient": "Patient/{{context.patientId}}"}

    def inputs(self, request: HookRequest, data: dict[str, Any], card: Any) -> HookInput | None:
        """Model inputs from the (pre)fetched ``data``; None when there is nothing to assess."""
        raise NotImplementedError

    def summary(self, pred: Any, card: Any) -> str | None:
        """The card's summary in the modality's words (< 140 characters); None: the generic
        one."""
        return None

    def detail_lines(self, pred: Any, card: Any) -> list[str]:
        """Extra Markdown lines for the card's detail."""
        return []


class ImageCdsAdapter(CdsAdapter):
    """Images from the patient's most recent ``Media`` or ``DocumentReference``."""

    hooks = ("patient-view", "order-select")
    description = "image analysis of the patient's most recent image"
    content_types = ("image/png", "image/jpeg", "application/dicom")

    def prefetch(self, card: Any, hook: str) -> dict[str, str]:
        return {
            "media": "Media?patient={{context.patientId}}&_sort=-created&_count=5",
            "documents": "DocumentReference?patient={{context.patientId}}"
                         "&_sort=-date&_count=5",
        }

    @staticmethod
    def _when(r: dict[str, Any]) -> str:
        return str(r.get("createdDateTime") or r.get("issued") or r.get("date") or "")

    def inputs(self, request: HookRequest, data: dict[str, Any], card: Any) -> HookInput | None:
        found = resources_in(data.get("media"), ("Media",))
        found += resources_in(data.get("documents"), ("DocumentReference",))
        found = [r for r in found if self._is_image(r)]
        if not found:
            return None
        latest = max(found, key=self._when)
        raw, _, name = attachment_from_resource(latest)
        ref = f"{latest['resourceType']}/{latest['id']}" if latest.get("id") else None
        return HookInput(sources=[{"name": name, "data": raw}], digests=[sha256_bytes(raw)],
                         basis=[ref] if ref else [],
                         notes=[f"Image: the most recent {latest['resourceType']}"
                                + (f" ({self._when(latest)[:10]})" if self._when(latest) else "")])

    def _is_image(self, r: dict[str, Any]) -> bool:
        if r.get("resourceType") == "Media":
            att = r.get("content") or {}
        else:
            att = ((r.get("content") or [{}])[0] or {}).get("attachment") or {}
        return str(att.get("contentType", "")).split(";")[0] in self.content_types


def _digest(value: Any) -> str:
    return sha256_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


class EcgCdsAdapter(CdsAdapter):
    """The patient's latest ECG waveform Observation (``valueSampledData``)."""

    description = "rhythm analysis of the patient's latest ECG"
    link_label = "Open the ECG trace with its attribution strip"

    def prefetch(self, card: Any, hook: str) -> dict[str, str]:
        from meddx.modalities.ecg_fhir import PREFETCH_QUERY

        return {"ecg": PREFETCH_QUERY}

    def inputs(self, request: HookRequest, data: dict[str, Any], card: Any) -> HookInput | None:
        from meddx.modalities.ecg_fhir import latest_waveform

        obs = latest_waveform(data.get("ecg"))
        if obs is None:
            return None
        when = str(obs.get("effectiveDateTime") or obs.get("issued") or "")[:16]
        return HookInput(sources=[obs], digests=[_digest(obs)],
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
        return _fit(head + text)

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

    def inputs(self, request: HookRequest, data: dict[str, Any], card: Any) -> HookInput | None:
        if not data.get("patient") or not data.get("encounter"):
            return None
        source = {k: data.get(k) for k in ("patient", "encounter", "observations")}
        given = request.prefetch or {}
        as_sent = all(k in given and given[k] is v for k, v in source.items())
        # all of it came in the body: hash the body rather than re-dump ~1 MB of JSON
        digest = request.body_sha256 if as_sent and request.body_sha256 else _digest(source)
        return HookInput(sources=[source], digests=[digest])

    def summary(self, pred: Any, card: Any) -> str | None:
        """E.g. ``icu v1.0.0: in-hospital death risk 34% (high); GCS low, lactate high and
        rising`` — calibrated risk, band from the card's thresholds, risk-raising findings."""
        from meddx.modalities.ehr_fhir import risk_band

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
        return _fit(text)

    def detail_lines(self, pred: Any, card: Any) -> list[str]:
        from meddx.modalities.ehr_fhir import risk_band

        pos = card.task.positive_class
        probs = pred.calibrated or pred.probabilities
        if not pos or pos not in probs:
            return []
        band, low, high = risk_band(float(probs[pos]), card)
        return [f"Risk band **{band}** (low < {low:.0%} ≤ moderate < {high:.0%} ≤ high, from "
                "the model card's operating points)."]


def _fit(text: str) -> str:
    return text if len(text) < 140 else text[:136] + "..."


def _rhythm_name(label: str) -> str:
    return {"af": "atrial fibrillation", "a": "atrial fibrillation", "n": "normal rhythm",
            "normal": "normal rhythm", "o": "other rhythm", "other": "other rhythm",
            "~": "noisy recording", "noisy": "noisy recording"}.get(label.lower(), label)


def adapter_for(modality: str) -> CdsAdapter | None:
    """The modality's adapter, or None when it has none (then no CDS service is offered)."""
    if modality not in CDS_ADAPTERS:
        return None
    try:
        return CDS_ADAPTERS.get(modality)()
    except Exception as e:  # noqa: BLE001 — a broken adapter must not stop the service
        logger.warning("CDS Hooks adapter for %s unavailable: %s", modality, e)
        return None


# --------------------------------------------------------------- FHIR access
MAX_PAGES = 50  # searchset pages followed per prefetch key (a 48 h ICU stay: ~1,500 items)


def _allowed(url: str, allow: tuple[str, ...]) -> bool:
    """``url`` is an allow-listed base URL or below one (``https://ehr.x/fhir`` does not allow
    ``https://ehr.x/fhir-evil`` nor ``https://ehr.x.evil``)."""
    url = url.rstrip("/")
    return any(url == a.rstrip("/") or url.startswith(a.rstrip("/") + "/") for a in allow)


def _next_link(value: Any) -> str | None:
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        return None
    for link in value.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _follow_pages(client: Any, first: dict[str, Any], server: str, headers: dict[str, str],
                  allow: tuple[str, ...]) -> dict[str, Any]:
    """All pages of a searchset Bundle merged into one (``next`` links on the same server)."""
    entries = list(first.get("entry") or [])
    page, pages = first, 1
    while (url := _next_link(page)) is not None:
        if not _allowed(url, (server,)) or not _allowed(url, allow):
            raise PrefetchMissingError("a next page lies outside the allow-listed FHIR server")
        if pages >= MAX_PAGES:
            raise PrefetchMissingError(f"more than {MAX_PAGES} pages of prefetch data")
        r = client.get(url, headers=headers)
        r.raise_for_status()
        page, pages = r.json(), pages + 1
        entries += page.get("entry") or []
    merged = {k: v for k, v in first.items() if k != "link"}
    merged["entry"] = entries
    return merged


def fetch_missing(request: HookRequest, templates: dict[str, str], allow: tuple[str, ...],
                  timeout: float) -> dict[str, Any]:
    """Prefetch values, fetching absent keys from ``fhirServer`` when it is allow-listed.

    A key present with ``null`` means the EHR found nothing; it is kept as None. Searchset
    Bundles with a ``next`` link (prefetched or fetched) are completed page by page from the
    same server, so a model never assesses a partial record.

    Raises:
        PrefetchMissingError: a key is absent (or a prefetched Bundle is incomplete) and the
            FHIR server cannot be used or reached.
    """
    given = request.prefetch or {}
    out = {k: given[k] for k in templates if k in given}
    missing = [k for k in templates if k not in given]
    paged = [k for k, v in out.items() if _next_link(v) is not None]
    if not missing and not paged:
        return out
    server = (request.fhirServer or "").rstrip("/")
    token = (request.fhirAuthorization or {}).get("access_token")
    if not server or not token or not _allowed(server, allow):
        what = "prefetch data missing" if missing else "prefetched data has further pages"
        raise PrefetchMissingError(f"{what} and the FHIR server cannot be used",
                                   hint="send the prefetch, or allow-list the fhirServer")
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for key in missing:
                r = client.get(f"{server}/{render_template(templates[key], request)}",
                               headers=headers)
                r.raise_for_status()
                out[key] = r.json()
            for key, value in out.items():
                if _next_link(value) is not None:
                    out[key] = _follow_pages(client, value, server, headers, allow)
    except (httpx.HTTPError, ValueError) as e:
        raise PrefetchMissingError("the FHIR server could not be reached") from e
    return out


# ------------------------------------------------------------------ feedback
class FeedbackStore:
    """CDS Hooks feedback as JSON lines; free-text comments are not kept (they may hold PHI)."""

    def __init__(self, path: Path, remember: int = 100_000) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cards: dict[str, str] = {}
        self._remember = remember

    def issued(self, card_uuid: str, service_id: str) -> None:
        with self._lock:
            if len(self._cards) >= self._remember:
                self._cards.pop(next(iter(self._cards)))
            self._cards[card_uuid] = service_id

    def add(self, service_id: str, body: FeedbackRequest, caller: dict[str, Any]) -> int:
        lines = []
        for fb in body.feedback:
            reason = fb.overrideReason.reason.model_dump() if fb.overrideReason and \
                fb.overrideReason.reason else None
            lines.append({
                "time": datetime.now(UTC).isoformat(timespec="seconds"), "service": service_id,
                "card": fb.card, "known_card": self._cards.get(fb.card) == service_id,
                "outcome": fb.outcome, "outcomeTimestamp": fb.outcomeTimestamp,
                "acceptedSuggestions": [s.get("id") for s in fb.acceptedSuggestions],
                "overrideReason": reason,
                "has_comment": bool(fb.overrideReason and fb.overrideReason.userComment),
                "caller": caller})
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
            f.flush()
        return len(lines)


# -------------------------------------------------------------------- schema
@lru_cache(maxsize=1)
def response_schema() -> dict[str, Any]:
    """The project's JSON Schema of a CDS Hooks 2.0 response (from the spec's card tables)."""
    text = resources.files("meddx.serving").joinpath(
        "schemas/cds_hooks_response.schema.json").read_text()
    return json.loads(text)


def validate_response(response: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``response`` breaks the CDS Hooks tables."""
    import jsonschema

    jsonschema.Draft202012Validator(response_schema()).validate(response)


def ensure_input(hook_input: HookInput | None) -> HookInput | None:
    if hook_input is not None and len(hook_input.sources) != len(hook_input.digests):
        raise DataError("adapter returned sources and digests of different lengths")
    return hook_input
