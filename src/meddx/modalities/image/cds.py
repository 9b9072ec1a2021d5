"""CDS Hooks for image models: the patient's most recent image (Media or DocumentReference)."""

from __future__ import annotations

from typing import Any

from meddx.fhir.cds import CdsAdapter, HookInput, resources_in, sha256_bytes
from meddx.fhir.resources import attachment_from_resource

__all__ = ["ImageCdsAdapter"]

class ImageCdsAdapter(CdsAdapter):
    """Images from the patient's most recent ``Media`` or ``DocumentReference``."""

    hooks = ("patient-view", "order-select")
    description = "image analysis of the patient's most recent image"
    input_noun = "image"
    link_label = "Open the image with its heat map"
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

    def inputs(self, request: Any, data: dict[str, Any], card: Any) -> HookInput | None:
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
