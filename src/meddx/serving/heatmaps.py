"""Short-lived heat maps behind signed, expiring links (for CDS Hooks cards and the web page).

A stored result holds only the rendered PNGs and the model's answer — no file names, no patient
identifiers. Links carry ``exp`` and an HMAC-SHA256 signature over ``id`` and ``exp``; a result
is deleted once its time to live has passed (checked on every write and read).

With a shared state store (``meddx serve --state redis://…``) each result is also written there
with the same time to live, so a link one replica put on a card opens on any replica (the
replicas must then share the link secret, ``MEDDX_LINK_SECRET``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from meddx.errors import NotFoundError

__all__ = ["HeatmapStore"]

logger = logging.getLogger(__name__)

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class HeatmapStore:
    """Results on disk for ``ttl_s`` seconds, reachable through signed links.

    Args:
        root: folder to keep them in (a private temporary folder when None).
        secret: HMAC key for links.
        ttl_s: time to live of a result and of its links.
        shared: a shared :class:`~meddx.serving.state.StateStore` that also keeps every
            result (None, or one not shared: results stay on this replica).
    """

    def __init__(self, root: Path | None, secret: str, ttl_s: int, shared: Any = None) -> None:
        self._shared = shared if shared is not None and shared.shared else None
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="meddx-heatmaps-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = secret.encode()
        self.ttl_s = ttl_s
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- links
    def sign(self, rid: str, exp: int) -> str:
        return hmac.new(self._key, f"{rid}.{exp}".encode(), hashlib.sha256).hexdigest()

    def query(self, rid: str) -> str:
        """``exp=…&sig=…`` for a result, expiring with it."""
        meta = self._meta(rid)
        exp = int(meta["expires"])
        return f"exp={exp}&sig={self.sign(rid, exp)}"

    def check(self, rid: str, exp: int, sig: str) -> None:
        """Raise NotFoundError unless the signature is right and the link has not expired."""
        good = hmac.compare_digest(self.sign(rid, int(exp)), sig or "")
        if not good or int(exp) < time.time():
            raise NotFoundError("this result link is invalid or has expired")

    # ----------------------------------------------------------------- store
    def put(self, files: dict[str, bytes], info: dict[str, Any]) -> str:
        """Keep ``files`` (``{"overlay.png": …}``) and ``info`` (the answer); return the id."""
        self.purge()
        rid = secrets.token_urlsafe(16)
        folder = self.root / rid
        folder.mkdir(mode=0o700)
        for name, data in files.items():
            (folder / Path(name).name).write_bytes(data)
        meta = {"expires": int(time.time()) + self.ttl_s, "info": info, "files": sorted(files)}
        (folder / "meta.json").write_text(json.dumps(meta))
        if self._shared is not None:
            for name, data in files.items():
                self._shared.put(f"hm:{rid}:{Path(name).name}", data, self.ttl_s)
            self._shared.put(f"hm:{rid}", json.dumps(meta).encode(), self.ttl_s)
        return rid

    def _folder(self, rid: str) -> Path:
        if not rid or not set(rid) <= _ID_CHARS:
            raise NotFoundError("unknown result")
        folder = self.root / rid
        if not folder.is_dir():
            raise NotFoundError("unknown or expired result")
        return folder

    def _meta(self, rid: str) -> dict[str, Any]:
        if self._shared is not None and not self._here(rid):
            raw = self._shared.get(f"hm:{rid}")
            if raw is None:
                raise NotFoundError("unknown or expired result")
            meta = json.loads(raw)
            if meta["expires"] < time.time():
                raise NotFoundError("unknown or expired result")
            return meta
        folder = self._folder(rid)
        meta = json.loads((folder / "meta.json").read_text())
        if meta["expires"] < time.time():
            shutil.rmtree(folder, ignore_errors=True)
            raise NotFoundError("unknown or expired result")
        return meta

    def info(self, rid: str) -> dict[str, Any]:
        """The stored answer and file names of a live result."""
        meta = self._meta(rid)
        return {"info": meta["info"], "files": meta["files"], "expires": meta["expires"]}

    def file(self, rid: str, name: str) -> bytes:
        meta = self._meta(rid)
        if name not in meta["files"]:
            raise NotFoundError("unknown file for this result")
        if self._shared is not None and not self._here(rid):
            data = self._shared.get(f"hm:{rid}:{name}")
            if data is None:
                raise NotFoundError("unknown or expired result")
            return data
        return (self._folder(rid) / name).read_bytes()

    def _here(self, rid: str) -> bool:
        """Whether this replica holds the result (checked id)."""
        return bool(rid) and set(rid) <= _ID_CHARS and (self.root / rid).is_dir()

    def purge(self) -> int:
        """Delete expired results; return how many went."""
        now, gone = time.time(), 0
        with self._lock:
            for meta_file in self.root.glob("*/meta.json"):
                try:
                    expired = json.loads(meta_file.read_text())["expires"] < now
                except (OSError, ValueError, KeyError):
                    expired = True
                if expired:
                    shutil.rmtree(meta_file.parent, ignore_errors=True)
                    gone += 1
        return gone

    def close(self) -> None:
        """Remove the folder when the store created it."""
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
