"""The pipeline fed from a DICOMweb server: QIDO-RS finds studies, WADO-RS retrieves them.

Each poll asks QIDO-RS for the studies (optionally from a Study Date on) with their
``NumberOfStudyRelatedInstances``; a study with more instances than the store holds is listed
with QIDO-RS at instance level and every instance the store does not know is retrieved with
WADO-RS, written to the work folder and recorded exactly as the listener records a C-STORE.
Studies already complete cost one QIDO row per poll and no retrieval; meddx's own results,
stored back into the study, are recognised by their SOP Instance UIDs and never fetched.

Credentials come from a file or an environment variable, never the command line (where
``ps`` and shell histories would show them): a bearer token, or ``user:password`` for basic.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any

from meddx.dicom.store import Store
from meddx.errors import AuthError, ConfigError, DataError

__all__ = ["read_credentials", "make_client", "Watcher"]

logger = logging.getLogger(__name__)
_UID = {"study": "0020000D", "series": "0020000E", "sop": "00080018", "count": "00201208"}


def read_credentials(file: str | Path | None = None, env: str | None = None,
                     kind: str = "bearer") -> dict[str, str]:
    """The Authorization header from a credentials file or environment variable ({}: none).

    The file or variable holds a token (``kind="bearer"``) or ``user:password``
    (``kind="basic"``), the same format as a :class:`~meddx.dicom.send.Destination`'s.

    Raises:
        ConfigError: the file or variable is missing or empty, both are given, or basic
            credentials lack the colon.
    """
    if file is not None and env is not None:
        raise ConfigError("give credentials by file or by environment variable, not both")
    if file is None and env is None:
        return {}
    if kind not in ("bearer", "basic"):
        raise ConfigError(f"unknown credentials kind {kind!r}; choose bearer or basic")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"cannot read the credentials file: {e.strerror}",
                              path=str(file)) from e
    else:
        text = os.environ.get(str(env), "").strip()
    if not text:
        raise ConfigError("the credentials are empty", hint="put the token (or user:password "
                          "with --auth basic) in the file or environment variable")
    if kind == "basic":
        if ":" not in text:
            raise ConfigError("basic credentials must read user:password")
        return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}
    return {"Authorization": "Bearer " + text}


def make_client(url: str, headers: dict[str, str] | None = None) -> Any:
    """A dicomweb-client for ``url`` sending ``headers`` (e.g. Authorization)."""
    from dicomweb_client import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"not a DICOMweb URL: {url!r}",
                          hint="e.g. http://pacs:8042/dicom-web (Orthanc's DICOMweb plugin)")
    return DICOMwebClient(url=url.rstrip("/"), headers=headers or None, timeout=30)


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(_UID[tag], {}).get("Value") or [None]
    return values[0]


class Watcher:
    """Polls a DICOMweb server and feeds new instances into a :class:`Store`.

    Args:
        client: a ``DICOMwebClient`` (see :func:`make_client`).
        store: the work folder's state.
        since: only studies with Study Date on or after this (``YYYYMMDD``; None: all).
        on_instance: called (study UID) after each new instance is recorded.
    """

    def __init__(self, client: Any, store: Store, since: str | None = None,
                 on_instance: Any = None) -> None:
        self.client, self.store, self.since, self.on_instance = client, store, since, on_instance
        self.folder = store.work / "instances"

    def poll(self) -> int:
        """One QIDO-RS round: the number of new instances retrieved.

        Raises:
            AuthError: the server refused the credentials. DataError: it did not answer.
        """
        filters = {"StudyDate": f"{self.since}-"} if self.since else None
        studies = self._call(self.client.search_for_studies, search_filters=filters,
                             fields=["NumberOfStudyRelatedInstances"], get_remaining=True)
        new = 0
        for item in studies:
            study = _value(item, "study")
            count = _value(item, "count")
            if study is None or (count is not None and
                                 int(count) <= self.store.count_instances(study)):
                continue
            new += self._retrieve_study(study)
        return new

    def _retrieve_study(self, study: str) -> int:
        key = self.store.study_key(study)
        new = 0
        for item in self._call(self.client.search_for_instances, study_instance_uid=study,
                               get_remaining=True):
            series, sop = _value(item, "series"), _value(item, "sop")
            if not series or not sop or self.store.has_instance(sop) or \
                    self.store.is_result(sop):
                continue
            ds = self._call(self.client.retrieve_instance, study, series, sop)
            dest = self.folder / key / f"{sop}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dest, enforce_file_format=True)
            self.store.add_instance(sop_uid=sop, study_uid=study, series_uid=series,
                                    sop_class=str(ds.get("SOPClassUID", "")), path=dest,
                                    size=dest.stat().st_size, calling_ae="DICOMWEB")
            new += 1
            if self.on_instance is not None:
                self.on_instance(study)
        if new:
            logger.info("retrieved %d instance(s) of study %s", new, key)
        return new

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else None
            if code in (401, 403):
                raise AuthError("the DICOMweb server refused the credentials",
                                hint="check the credentials file or variable") from e
            raise DataError(f"DICOMweb request failed with HTTP {code}") from e
        except requests.RequestException as e:
            raise DataError(f"DICOMweb server unreachable: {type(e).__name__}",
                            hint="check the URL and that the server runs") from e
