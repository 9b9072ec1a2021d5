"""The DICOM node: a C-STORE SCP with C-ECHO (pynetdicom) feeding the work folder.

Instances are streamed to disk by pynetdicom (``STORE_RECV_CHUNKED_DATASET``: the dataset is
written to a file as its PDUs arrive, never decoded in memory), checked, moved under
``work/instances/`` and recorded in the :class:`~meddx.dicom.store.Store`. Associations are
accepted only from allow-listed calling AE titles (and hosts, ``AE@host``), at most
``max_associations_per_ae`` at a time per AE. Anything wrong with an instance is answered
with a DIMSE failure status and an Error Comment saying why; the listener never crashes on
bad input.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from meddx.dicom.store import Store
from meddx.errors import ConfigError

__all__ = ["ListenerConfig", "Listener", "parse_allow", "STATUS"]

logger = logging.getLogger(__name__)

# DIMSE C-STORE status codes (PS3.4 B.2.3)
STATUS = {"success": 0x0000, "out-of-resources": 0xA700, "mismatch": 0xA900,
          "cannot-understand": 0xC000}


def parse_allow(entries: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """``["PACS@10.0.0.5", "CT1"]`` → ``{"PACS": "10.0.0.5", "CT1": None}``.

    Raises:
        ConfigError: an empty or over-long AE title.
    """
    out: dict[str, str | None] = {}
    for entry in entries:
        ae, _, host = entry.partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16:
            raise ConfigError(f"--allow {entry!r}: an AE title has 1 to 16 characters",
                              hint="write AE or AE@host, e.g. --allow ORTHANC@127.0.0.1")
        out[ae] = host.strip() or None
    return out


class ListenerConfig(BaseModel):
    """How the node answers: its AE title, port, allow list and limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str = "MEDDX"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allow: dict[str, str | None] = Field(default_factory=dict)
    max_instance_bytes: int = Field(512 * 1024 * 1024, gt=0)
    max_instances_per_study: int = Field(5000, gt=0)
    max_associations_per_ae: int = Field(4, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not v.strip() or len(v) > 16:
            raise ValueError("an AE title has 1 to 16 characters")
        return v.strip()


def _status(code: str, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = STATUS[code]
    ds.ErrorComment = comment[:64]  # LO: 64 characters
    return ds


class Listener:
    """C-STORE + C-ECHO SCP writing into a :class:`Store` (start/stop; non-blocking).

    Args:
        store: the work folder's state.
        config: AE title, port, allow list and limits.
        on_instance: called (study UID) after each new instance is recorded; the pipeline
            uses it to restart its quiet-interval clock.
    """

    def __init__(self, store: Store, config: ListenerConfig,
                 on_instance: Any = None) -> None:
        if not config.allow:
            raise ConfigError("the listener accepts no one: no calling AE title is allowed",
                              hint="add --allow AE or --allow AE@host (the PACS's AE title)")
        self.store, self.config, self.on_instance = store, config, on_instance
        self.folder = store.work / "instances"
        self._server: Any = None
        self._study_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        return int(self._server.server_address[1]) if self._server else self.config.port

    def start(self) -> None:
        """Bind the port and serve in background threads."""
        from pynetdicom import AE, _config, evt
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.config.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_associations = 64
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda e: 0x0000),
                    (evt.EVT_REQUESTED, self._on_requested)]
        try:
            self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                           evt_handlers=handlers)
        except OSError as e:
            raise ConfigError(f"cannot listen on port {self.config.port}: {e.strerror}",
                              hint="choose another --port or stop the process holding it") from e
        logger.info("DICOM listener %s on port %d", self.config.ae_title, self.port)

    def stop(self) -> None:
        """Stop serving (open associations are closed)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ------------------------------------------------------------------ association
    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        host = assoc.requestor.address
        allowed = calling in self.config.allow and self.config.allow[calling] in (None, host)
        if not allowed:
            logger.warning("association refused: calling AE %r from %s is not allowed",
                           calling, host)
            self._reject(assoc, (0x01, 0x01, 0x03))  # permanent: calling AE not recognised
            return
        busy = sum(1 for a in assoc.ae.active_associations
                   if a is not assoc and a.is_acceptor and a.requestor.primitive is not None
                   and a.requestor.primitive.calling_ae_title.strip() == calling)
        if busy >= self.config.max_associations_per_ae:
            logger.warning("association refused: %s already has %d open", calling, busy)
            self._reject(assoc, (0x02, 0x03, 0x02))  # transient: local limit exceeded

    @staticmethod
    def _reject(assoc: Any, rsd: tuple[int, int, int]) -> None:
        from pynetdicom import evt

        assoc.acse.send_reject(*rsd)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.is_rejected = True
        assoc.kill()  # lets the DUL send the A-ASSOCIATE-RJ before the socket closes

    # ------------------------------------------------------------------ C-STORE
    def _on_store(self, event: Any) -> Any:
        try:
            return self._store(event)
        except Exception as e:  # never let one instance take the node down
            logger.exception("C-STORE failed: %s", type(e).__name__)
            return _status("out-of-resources", f"meddx could not store it: {type(e).__name__}")

    def _store(self, event: Any) -> Any:
        src = Path(event.dataset_path)
        size = src.stat().st_size
        if size > self.config.max_instance_bytes:
            return _status("out-of-resources",
                           f"instance of {size} bytes over the {self.config.max_instance_bytes}"
                           "-byte limit")
        try:
            ds = dcmread(src, stop_before_pixels=True)
        except (InvalidDicomError, AttributeError, KeyError, ValueError, EOFError, OSError) as e:
            return _status("cannot-understand", f"not readable as DICOM: {type(e).__name__}")
        names = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        uids = tuple(str(ds.get(n) or "") for n in names)
        missing = [n for n, v in zip(names, uids, strict=True) if not v]
        if missing:
            return _status("cannot-understand", f"missing {', '.join(missing)}")
        study, series, sop, sop_class = uids
        if sop != str(event.request.AffectedSOPInstanceUID):
            return _status("mismatch", "SOP Instance UID differs from the request's")
        if self.store.has_instance(sop):
            self.store.add_instance(sop_uid=sop, study_uid=study, series_uid=series,
                                    sop_class=sop_class, path=src, size=size, calling_ae="")
            logger.info("duplicate instance for study %s ignored", self.store.study_key(study))
            return 0x0000
        key = self.store.study_key(study)
        with self._study_lock:  # count and insert as one step per study
            if self.store.count_instances(study) >= self.config.max_instances_per_study:
                return _status("out-of-resources", "study over the "
                               f"{self.config.max_instances_per_study}-instance limit")
            dest = self.folder / key / f"{sop}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            calling = event.assoc.requestor.ae_title.strip()
            self.store.add_instance(sop_uid=sop, study_uid=study, series_uid=series,
                                    sop_class=sop_class, path=dest, size=size, calling_ae=calling)
        logger.info("stored instance %d of study %s", self.store.count_instances(study), key)
        if self.on_instance is not None:
            self.on_instance(study)
        return 0x0000
