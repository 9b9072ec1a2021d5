"""Checks on uploaded inputs before any decoder sees them.

* the declared content type must be one the model's modality reads (else 415, with the
  modality's ``upload_hint``);
* the modality looks at the header (:meth:`~meddx.modalities.base.Modality.inspect_upload`):
  bytes that contradict the declared type are refused, and what the header declares — pixels
  and decoded bytes — is compared with the service's caps before decoding, so a decompression
  bomb is refused with 413 and never expanded.

The service knows no modality by name: content types, hints and header parsing come from the
Modality contract.
"""

from __future__ import annotations

import logging
from typing import Any

from meddx.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from meddx.modalities.base import Upload

__all__ = ["Upload", "UnsupportedMediaTypeError", "check_upload", "content_type_allowed"]

logger = logging.getLogger(__name__)


def _base_type(content_type: str | None) -> str:
    return (content_type or "application/octet-stream").split(";")[0].strip().lower()


def content_type_allowed(ctype: str, allowed: frozenset[str] | set[str]) -> bool:
    """Whether ``ctype`` is in ``allowed`` (where ``text/*`` admits any text type)."""
    return ctype in allowed or ("text/*" in allowed and ctype.startswith("text/"))


def check_upload(upload: Upload, modality: Any, max_pixels: int,
                 max_decoded_bytes: int | None = None) -> int | None:
    """Content type and header checks before decoding.

    Args:
        upload: the input.
        modality: the model's :class:`~meddx.modalities.base.Modality`.
        max_pixels: largest accepted number of pixels (voxels × frames).
        max_decoded_bytes: largest accepted decoded size (pixels × channels × bytes per
            sample); None: no cap.

    Returns:
        The pixel count the header declares (None when unknown or not an image).

    Raises:
        UnsupportedMediaTypeError: the content type is not one the model reads.
        DataError: the bytes are not what the content type says, or the header is corrupt.
        PayloadTooLargeError: the header declares more pixels or decoded bytes than the caps.
    """
    ctype = _base_type(upload.content_type)
    if not content_type_allowed(ctype, modality.upload_content_types):
        raise UnsupportedMediaTypeError(
            f"content type {ctype} is not read by {modality.name} models",
            hint=modality.upload_hint)
    declared = modality.inspect_upload(upload)
    if declared.pixels is not None and declared.pixels > max_pixels:
        raise PayloadTooLargeError(
            f"the image declares {declared.pixels:,} pixels; the limit is {max_pixels:,}",
            hint="downsample the image before sending it")
    if max_decoded_bytes is not None and declared.decoded_bytes is not None \
            and declared.decoded_bytes > max_decoded_bytes:
        raise PayloadTooLargeError(
            f"the image would decode to {declared.decoded_bytes / 2**20:,.1f} MiB "
            f"(pixels × channels × bytes per sample); the limit is "
            f"{max_decoded_bytes / 2**20:,.1f} MiB",
            hint="downsample it, drop unused channels (e.g. alpha) or use 8-bit samples "
                 "before sending it")
    return declared.pixels
