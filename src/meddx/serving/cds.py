"""CDS Hooks 2.0: services, prefetch, cards, feedback.

One ``patient-view`` service per package (plus ``order-select`` where the modality's adapter
offers it). A :class:`CdsAdapter` says, for one modality, which FHIR data the service asks the
EHR to prefetch and how to turn that data into model inputs; the rest (calling the model,
building the card, the heat-map link, the fail-safe) is shared. The contract lives in
:mod:`meddx.fhir.cds`; each modality folder that answers CDS Hooks has its adapter in its
``cds.py`` and names it in its ``CDS_ADAPTERS``, from which :data:`CDS_ADAPTERS` is built.

Fail-safe: anything that goes wrong after the request is authenticated and its data is
available ends in an answer with **no card** (and a log line saying why) — never a reassuring one.
A missing prefetch that cannot be fetched from ``fhirServer`` is a ``412``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from meddx.errors import DataError, ServingError
from meddx.fhir.cds import CdsAdapter, HookInput, resources_in
from meddx.modalities import registered
from meddx.registry import Registry
from meddx.serving.cards import OVERRIDE_REASONS

__all__ = [
    "CDS_ADAPTERS",
    "CdsAdapter",
    "HookRequest",
    "HookInput",
    "FeedbackRequest",
    "FeedbackStore",
    "PrefetchMissingError",
    "adapter_for",
    "ensure_input",
    "patient_side_inputs",
    "service_prefetch",
    "fetch_missing",
    "render_template",
    "resources_in",
    "response_schema",
    "validate_response",
]

logger = logging.getLogger(__name__)

CDS_ADAPTERS: Registry[type] = Registry("CDS Hooks adapter")
# entries come from the modality folders' CDS_ADAPTERS (meddx/modalities/<name>/cds.py)
for _name, _target in registered("CDS_ADAPTERS").items():
    CDS_ADAPTERS.register(_name, _target)


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


# ------------------------------------------------------------------- adapters
def adapter_for(modality: str) -> CdsAdapter | None:
    """The modality's adapter, or None when it has none (then no CDS service is offered)."""
    if modality not in CDS_ADAPTERS:
        return None
    try:
        return CDS_ADAPTERS.get(modality)()
    except Exception as e:  # noqa: BLE001 — a broken adapter must not stop the service
        logger.warning("CDS Hooks adapter for %s unavailable: %s", modality, e)
        return None


def _takes_side_inputs(card: Any) -> bool:
    """Whether the caller supplies side inputs (features a modality derives itself, such as an
    ECG's rhythm features, need no Patient)."""
    fusion = getattr(card, "side_inputs", None)
    return fusion is not None and bool(fusion.inputs)


def service_prefetch(adapter: CdsAdapter, card: Any, hook: str) -> dict[str, str]:
    """The adapter's prefetch templates, plus the ``Patient`` when the model takes side
    inputs (age from ``birthDate``, sex from ``gender``)."""
    templates = dict(adapter.prefetch(card, hook))
    if _takes_side_inputs(card) and "patient" not in templates:
        templates["patient"] = "Patient/{{context.patientId}}"
    return templates


def patient_side_inputs(card: Any, data: dict[str, Any], n: int
                        ) -> tuple[tuple[list[Any], str] | None, list[str]]:
    """Side inputs for ``n`` inputs from the prefetched FHIR ``Patient`` (age in years at the
    service date, today in UTC; sex from gender) and the card lines saying what was used and
    what was missing; ``(None, [])`` for a model without side inputs.

    Raises:
        DataError: a malformed birth date or gender (the service answers with no card).
    """
    if not _takes_side_inputs(card):
        return None, []
    from meddx.sideinputs import from_patient

    patient = data.get("patient")
    record, notes = from_patient(patient, datetime.now(UTC).date())
    names = [s.name for s in card.side_inputs.inputs]
    used = [f"{k} {v}" + (" years" if k == "age" else "") for k, v in record.items()
            if k in names]
    missing = [k for k in names if k not in record]
    lines = ["Side inputs from the FHIR Patient: " + (", ".join(used) or "none")]
    if missing:
        lines.append(f"Missing side inputs (flagged to the model, not imputed): "
                     f"{', '.join(missing)}" + (f" ({'; '.join(notes)})" if notes else ""))
    return ([{k: v for k, v in record.items() if k in names}] * n, "FHIR Patient"), lines


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
_OFFERED = {r["code"]: r for r in OVERRIDE_REASONS}
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
OTHER_REASON = "other"


def offered_reason(coding: Any) -> dict[str, Any] | None:
    """The override reason as stored: one of the service's own (code, system and display
    from its discovery document, never the client's text), or ``{"code": "other"}`` for any
    other coding — its code and display are free text from the EHR and are not kept."""
    if coding is None:
        return None
    offered = _OFFERED.get(coding.code)
    if offered is not None and coding.system in (None, offered["system"]):
        return dict(offered)
    return {"code": OTHER_REASON}


def _uuid_or_none(value: Any) -> str | None:
    """Card and suggestion ids are UUIDs the service issued; anything else is client text."""
    return value if isinstance(value, str) and _UUID.fullmatch(value) else None


def _timestamp_or_none(value: str) -> str | None:
    try:
        return datetime.fromisoformat(value).isoformat()
    except (TypeError, ValueError):
        return None


class FeedbackStore:
    """CDS Hooks feedback as JSON lines, holding no text written by the EHR or its users:
    free-text comments are counted, never kept; override reasons are the service's own codes
    or ``other``; card and suggestion ids are kept only as UUIDs, timestamps only as times."""

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
            reason = offered_reason(fb.overrideReason.reason if fb.overrideReason else None)
            lines.append({
                "time": datetime.now(UTC).isoformat(timespec="seconds"), "service": service_id,
                "card": _uuid_or_none(fb.card),
                "known_card": self._cards.get(fb.card) == service_id,
                "outcome": fb.outcome,
                "outcomeTimestamp": _timestamp_or_none(fb.outcomeTimestamp),
                "acceptedSuggestions": [i for i in (_uuid_or_none(s.get("id"))
                                                    for s in fb.acceptedSuggestions) if i],
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
