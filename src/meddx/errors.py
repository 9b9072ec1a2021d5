"""The one exception tree of meddx.

Every error a user can cause is a :class:`MeddxError`; code that catches
``MeddxError`` catches them all, and the service maps each branch to one HTTP
status in a single handler::

    MeddxError                      base; carries ``context`` (sample_id, path, task …) and a hint
    ├── ConfigError                 bad or unknown configuration, names, options          → 400
    ├── DataError                   unreadable, malformed or mislabelled input data       → 422
    │   ├── InputMismatchError      valid data that does not fit the model (shape, modality) → 422
    │   └── UnsupportedMediaTypeError  a content type the model does not read              → 415
    ├── ModelError                  package missing, tampered (sha256), incompatible      → 500/409
    ├── EvaluationError             evaluation impossible (split absent, wrong dataset)   → 400
    └── ServingError                service-level failures                                → 500
        ├── AuthError               missing or invalid credentials (reason never echoed)  → 401
        ├── NotFoundError           unknown model or resource                             → 404
        ├── PayloadTooLargeError    body or image dimensions over the configured cap      → 413
        └── OverloadedError         concurrency limit reached                             → 503

Errors chain with ``raise … from e`` so the original cause stays visible.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MeddxError",
    "ConfigError",
    "DataError",
    "InputMismatchError",
    "UnsupportedMediaTypeError",
    "ModelError",
    "EvaluationError",
    "ServingError",
    "AuthError",
    "NotFoundError",
    "PayloadTooLargeError",
    "OverloadedError",
]


class MeddxError(Exception):
    """Base of every meddx error.

    Args:
        message: what went wrong, in words a user understands.
        hint: what to do about it (optional).
        **context: identifying details (``path``, ``sample_id``, ``task`` …); never PHI.
    """

    status_code: int = 500

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        self.message = message
        self.hint = hint
        self.context = {k: v for k, v in context.items() if v is not None}
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message
        if self.context:
            details = ", ".join(f"{k}={v}" for k, v in self.context.items())
            text = f"{text} ({details})"
        if self.hint:
            text = f"{text}. {self.hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description (used by the service and ``--format json``)."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "context": {k: str(v) for k, v in self.context.items()},
        }


class ConfigError(MeddxError):
    """Invalid configuration, unknown registry name, or unusable option."""

    status_code = 400


class DataError(MeddxError):
    """Input data that cannot be read or whose labels do not fit the task."""

    status_code = 422


class InputMismatchError(DataError):
    """Readable input that does not match what the model was trained on."""

    status_code = 422


class UnsupportedMediaTypeError(DataError):
    """A content type the model cannot read (HTTP 415)."""

    status_code = 415


class ModelError(MeddxError):
    """A model package is missing, incomplete, tampered with or incompatible."""

    status_code = 500


class EvaluationError(MeddxError):
    """Evaluation cannot be carried out as asked."""

    status_code = 400


class ServingError(MeddxError):
    """A failure inside the service."""

    status_code = 500


class AuthError(ServingError):
    """Missing or invalid credentials. The message is never shown to the caller."""

    status_code = 401


class NotFoundError(ServingError):
    """Unknown model or resource."""

    status_code = 404


class PayloadTooLargeError(ServingError):
    """Request body or decoded image larger than allowed."""

    status_code = 413


class OverloadedError(ServingError):
    """The service is at its concurrency limit."""

    status_code = 503
