"""From received instances to results queued for the PACS.

A study is *complete* when nothing of it has arrived for ``quiet`` seconds (or, after a
restart, at once: whatever the store still lists as pending). Each of its pending series is
routed (:mod:`meddx.dicom.routing`); every model that accepts it answers:

* a 2D model reads each image; the series answer is the image with the highest calibrated
  risk (``aggregate: max``, the default: one suspicious image makes a suspicious study) or
  the answer on the mean logits (``aggregate: mean``); the SR says which;
* a 3D model reads the series as one volume, slices ordered by their position along the
  slice normal (ImagePositionPatient · the normal of ImageOrientationPatient), spacing from
  PixelSpacing and the slice positions;
* a whole-slide model (its modality reads slides) reads a VL Whole Slide Microscopy series as
  one slide and answers with a slide-level result and its attention map
  (:mod:`meddx.dicom.slides`).

The answer (:class:`~meddx.dicom.model.SeriesAnalysis`) is written as DICOM by
:func:`~meddx.dicom.results.result_datasets` and queued in the :class:`~meddx.dicom.send.Outbox`.
The analysis is keyed by (series, model, package sha256, instances): an analysis already queued
is never made again, and one repeated after a crash between queueing and bookkeeping makes
the *same* objects (the writers derive result UIDs from the same inputs), which the PACS
stores once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from meddx.dicom.model import Algorithm, SeriesAnalysis
from meddx.dicom.routing import ModelSlot, RoutingConfig, SeriesInfo, choose, series_info
from meddx.dicom.store import InstanceRow, Store
from meddx.errors import MeddxError

__all__ = ["Pipeline", "ordered_volume", "aggregate", "stored_analyses", "update_worklist"]

logger = logging.getLogger(__name__)
_MAX_HEATMAPS_3D = 3  # a volume's heat map goes out on its hottest slices only


@dataclass
class _Model:
    predictor: Any
    slot: ModelSlot
    algorithm: Algorithm


def ordered_volume(paths: list[Path]) -> tuple[np.ndarray, list[Path], tuple[float, ...]]:
    """Slices read into a (D, H, W) float32 volume ordered along the slice normal.

    Returns:
        the volume (Rescale Slope/Intercept applied), the paths in volume order, and the
        spacing (slice, row, column) in mm from the headers (1.0 where a header is silent).

    Raises:
        MeddxError (DataError): slices of different sizes or without pixel data.
    """
    from meddx.errors import DataError

    heads = [(p, dcmread(p)) for p in paths]

    def position(ds: Any) -> float:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is None or iop is None:
            return float(ds.get("InstanceNumber", 0) or 0)
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return float(np.dot(normal, np.asarray(ipp, float)))

    heads.sort(key=lambda h: position(h[1]))
    try:
        slices = [h[1].pixel_array.astype(np.float32) * float(h[1].get("RescaleSlope", 1) or 1)
                  + float(h[1].get("RescaleIntercept", 0) or 0) for h in heads]
        volume = np.stack(slices)
    except (ValueError, AttributeError) as e:
        raise DataError(f"slices cannot form a volume: {e}") from e
    pos = [position(h[1]) for h in heads]
    dz = float(np.median(np.diff(pos))) if len(pos) > 1 and np.ptp(pos) > 0 else float(
        heads[0][1].get("SliceThickness", 1.0) or 1.0)
    row, col = (float(v) for v in heads[0][1].get("PixelSpacing", [1.0, 1.0]))
    return volume, [h[0] for h in heads], (abs(dz), row, col)


def aggregate(predictor: Any, samples: list[Any], per_image: list[Any], how: str
              ) -> tuple[Any, str]:
    """The series answer from per-image Predictions, and the sentence the SR carries."""
    if how == "mean":
        # averaging probabilities would skip calibration and the conformal set; the mean
        # logit goes through the predictor's own finalisation instead
        logits = np.concatenate([predictor.logits(s.tensor[None]) for s in samples])
        series = predictor.finalize(logits.mean(axis=0, keepdims=True), ["series"])[0]
        if per_image[0].ood is not None:
            series.ood = any(bool(p.ood) for p in per_image)
            if series.ood:
                series.decision, series.operating_point, series.threshold = None, None, None
        return series, f"answer on the mean logit of {len(per_image)} images"
    best = max(per_image, key=lambda p: (bool(p.ood), p.risk if p.risk is not None else -1.0))
    return best, (f"maximum calibrated risk over {len(per_image)} images "
                  f"(image {best.id}); any out-of-distribution image flags the series")


class Pipeline:
    """Routes complete studies to the models and queues their results.

    Args:
        store: the work folder's state.
        predictors: the loaded models (:class:`meddx.inference.Predictor`).
        outbox: where results are queued (:class:`meddx.dicom.send.Outbox`).
        destination: where results go (:class:`meddx.dicom.send.Destination`).
        routing: the routing file's rules.
        quiet: seconds without a new instance after which a study is complete.
        deid: send de-identified copies (research destination) instead of the originals.
        explain: attach Grad-CAM heat maps.
    """

    def __init__(self, store: Store, predictors: list[Any], outbox: Any, destination: Any,
                 routing: RoutingConfig | None = None, *, quiet: float = 10.0,
                 deid: bool = False, explain: bool = True) -> None:
        routing = routing or RoutingConfig()
        self.store, self.outbox, self.destination = store, outbox, destination
        self.models = [_Model(p, ModelSlot.from_card(p.card, routing),
                              Algorithm.from_predictor(p)) for p in predictors]
        self.quiet, self.deid, self.explain = quiet, deid, explain
        self._lock = threading.Lock()
        self._audit_lock = threading.Lock()

    # ------------------------------------------------------------------ driving
    def process_ready(self, now: float | None = None) -> list[str]:
        """Process every complete study; their salted keys."""
        done = []
        with self._lock:
            for study in self.store.complete_studies(self.quiet, now):
                self.process_study(study)
                done.append(self.store.study_key(study))
        return done

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Process complete studies and deliver queued results until ``stop`` is set; each
        study's results are delivered as soon as it is processed, not after the batch."""
        while not stop.is_set():
            try:
                for study in self.store.complete_studies(self.quiet):
                    with self._lock:
                        self.process_study(study)
                    self.outbox.deliver()
                    if stop.is_set():
                        break
                self.outbox.deliver()  # retries of earlier results whose time has come
            except Exception:  # a bad study must not stop the node; it is logged by key
                logger.exception("pipeline step failed")
            stop.wait(interval)

    def process_study(self, study_uid: str) -> None:
        """Route and analyse a study's pending instances (each ends analysed or failed)."""
        key = self.store.study_key(study_uid)
        by_series: dict[str, list[InstanceRow]] = defaultdict(list)
        for row in self.store.pending_instances(study_uid):
            by_series[row.series_uid].append(row)
        for series_uid, rows in by_series.items():
            try:
                self._series(study_uid, series_uid, rows)
            except MeddxError as e:
                logger.warning("series of study %s failed: %s", key, type(e).__name__)
                self._fail_rest(study_uid, series_uid, rows, str(e))
            except Exception as e:  # a library bug on one series must not poison the node:
                # the series is listed (and logged by key), never retried forever
                logger.exception("series of study %s failed", key)
                self._fail_rest(study_uid, series_uid, rows, f"internal error: "
                                f"{type(e).__name__}")
        self.store.finish_study(study_uid)
        update_worklist(self.store, study_uid)
        logger.info("study %s processed", key)

    def _deidentify(self, analysis: SeriesAnalysis, datasets: list[Any]) -> list[Any]:
        """Research copies. A heat map carries meddx's own burned-in label (no PHI) on the
        source's pixels: it goes only when its source is not flagged as having burned-in
        text itself (BurnedInAnnotation YES), else it is left out and the SR goes alone."""
        from meddx.privacy.deid import deidentify

        flagged = set()
        for path in analysis.sources:
            head = dcmread(path, stop_before_pixels=True)
            if str(head.get("BurnedInAnnotation", "")).upper() == "YES":
                flagged.add(str(head.SOPInstanceUID))
        out = []
        for ds in datasets:
            refs = {str(r.ReferencedSOPInstanceUID) for r in ds.get("SourceImageSequence", [])}
            if refs & flagged:
                logger.warning("heat map left out of the de-identified results of study %s: "
                               "its source has burned-in text", self.store.study_key(
                                   analysis.study_uid))
                continue
            out.append(deidentify(ds, salt=self.store.salt, allow_burned_in=bool(refs))[0])
        return out

    def _audit(self, model: _Model, analysis: SeriesAnalysis, n_results: int) -> None:
        """One ``predict`` line per analysis in ``work/audit.jsonl``, in the service's audit
        format (``meddx monitor`` reads it); studies and instances by salted hashes only."""
        import datetime as dt
        import json

        preds = [p for _, p in analysis.per_image] or [analysis.prediction]
        outputs = []
        for p in preds:
            out = p.to_dict()
            out["id"] = self.store.study_key(p.id)  # a salted hash, like the study's
            out.pop("notes", None)
            outputs.append(out)
        line = {"time": dt.datetime.now(dt.UTC).isoformat(), "event": "predict",
                "route": "dicom", "request_id": self.store.study_key(analysis.study_uid),
                "model": {"name": model.algorithm.name, "version": model.algorithm.version,
                          "sha256": model.algorithm.package_sha256},
                "aggregate": "slide" if model.slot.slide else "volume"
                if model.slot.spatial_dims == 3 else model.slot.route.aggregate,
                "results_queued": n_results,
                "outputs": outputs}
        with self._audit_lock, (self.store.work / "audit.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _fail_rest(self, study_uid: str, series_uid: str, rows: list[InstanceRow],
                   detail: str) -> None:
        self.store.fail([r.sop_uid for r in rows], "model-error", detail[:300],
                        study_uid=study_uid, series_uid=series_uid)

    # ------------------------------------------------------------------ one series
    def _series(self, study_uid: str, series_uid: str, rows: list[InstanceRow]) -> None:
        uids = [r.sop_uid for r in rows]
        try:
            head = dcmread(rows[0].path, stop_before_pixels=True)
        except Exception as e:  # pydicom raises many kinds on a damaged file
            self.store.fail(uids, "decode-failure", f"header unreadable: {type(e).__name__}",
                            study_uid=study_uid, series_uid=series_uid)
            return
        info = series_info(head, len(self.store.series_instances(series_uid)))
        accepted, why = choose([m.slot for m in self.models], info)
        if not accepted:
            reason = "unsupported-sop-class" if not info.has_pixels else "no-matching-model"
            self.store.fail(uids, reason, why, study_uid=study_uid, series_uid=series_uid)
            return
        for model in (m for m in self.models if m.slot in accepted):
            if model.slot.slide:
                self._slide(model, study_uid, series_uid)
            elif model.slot.spatial_dims == 3:
                self._volume(model, study_uid, series_uid, info)
            else:
                self._images(model, study_uid, series_uid, rows)

    def _images(self, model: _Model, study_uid: str, series_uid: str,
                rows: list[InstanceRow]) -> None:
        pred = model.predictor
        samples, used = [], []
        for r in rows:
            try:
                s = pred.read(r.path)
            except MeddxError as e:
                self.store.fail([r.sop_uid], _read_reason(e), f"{model.algorithm.name}: {e}",
                                study_uid=study_uid, series_uid=series_uid)
                continue
            s.id = r.sop_uid
            samples.append(s)
            used.append(r)
        if not samples:
            return
        preds = pred.predict_samples(samples, explain=self.explain)
        series, how = aggregate(pred, samples, preds, model.slot.route.aggregate)
        heat = tuple((r.sop_uid, _to_grid(p.explanation, r.path)) for r, p in
                     zip(used, preds, strict=True) if p.explanation is not None)
        analysis = SeriesAnalysis(study_uid=study_uid, series_uid=series_uid,
                                  sources=tuple(r.path for r in used), algorithm=model.algorithm,
                                  prediction=series, per_image=tuple(
                                      (r.sop_uid, p) for r, p in zip(used, preds, strict=True)),
                                  heatmaps=heat, aggregation=how)
        self._emit(model, analysis, [r.sop_uid for r in used])

    def _volume(self, model: _Model, study_uid: str, series_uid: str, info: SeriesInfo) -> None:
        rows = self.store.series_instances(series_uid)
        by_path = {r.path: r for r in rows}
        try:
            volume, order, spacing = ordered_volume([r.path for r in rows])
        except Exception as e:  # undecodable pixels, mismatched slices
            self.store.fail([r.sop_uid for r in rows], "decode-failure", str(e)[:300],
                            study_uid=study_uid, series_uid=series_uid)
            return
        npy = self.store.work / "volumes" / f"{_digest(series_uid)}.npy"
        npy.parent.mkdir(exist_ok=True)
        np.save(npy, volume[None])  # (C=1, D, H, W): read as one 3D image
        pred = model.predictor
        try:
            sample = pred.read(npy)
        except MeddxError as e:
            self.store.fail([r.sop_uid for r in rows], _read_reason(e),
                            f"{model.algorithm.name}: {e}", study_uid=study_uid,
                            series_uid=series_uid)
            return
        finally:
            npy.unlink(missing_ok=True)
        sample.id = series_uid
        sample.meta.pop("path", None)
        p = pred.predict_samples([sample], explain=self.explain)[0]
        heat: tuple[tuple[str, np.ndarray], ...] = ()
        if p.explanation is not None:
            heat = _slice_maps(p.explanation, volume.shape, [by_path[o].sop_uid for o in order])
        how = (f"one volume of {len(order)} slices ordered by ImagePositionPatient, spacing "
               f"{spacing[0]:.3g} x {spacing[1]:.3g} x {spacing[2]:.3g} mm")
        analysis = SeriesAnalysis(study_uid=study_uid, series_uid=series_uid,
                                  sources=tuple(order), algorithm=model.algorithm, prediction=p,
                                  heatmaps=heat, aggregation=how)
        self._emit(model, analysis, [r.sop_uid for r in rows])

    def _slide(self, model: _Model, study_uid: str, series_uid: str) -> None:
        from meddx.dicom.routing import VL_WSM
        from meddx.dicom.slides import analyse_slide

        rows = self.store.series_instances(series_uid)
        other = [r.sop_uid for r in rows if r.sop_class != VL_WSM]
        if other:
            self.store.fail(other, "unsupported-sop-class", "not a VL Whole Slide Microscopy "
                            "instance in a whole-slide series", study_uid=study_uid,
                            series_uid=series_uid)
        slide = [r for r in rows if r.sop_class == VL_WSM]
        try:
            analysis = analyse_slide(model.predictor, model.algorithm, self.store.work,
                                     study_uid, series_uid, slide, explain=self.explain)
        except MeddxError as e:
            self.store.fail([r.sop_uid for r in slide], _read_reason(e),
                            f"{model.algorithm.name}: {e}"[:300], study_uid=study_uid,
                            series_uid=series_uid)
            return
        self._emit(model, analysis, [r.sop_uid for r in slide])

    # ------------------------------------------------------------------ results
    def _emit(self, model: _Model, analysis: SeriesAnalysis, sop_uids: list[str]) -> None:
        from meddx.dicom.results import result_datasets

        key = _digest(analysis.series_uid, model.algorithm.name,
                      model.algorithm.package_sha256, *sorted(sop_uids))
        known = self.store.analysis(key)
        if known is not None and known["state"] == "queued":
            self.store.mark_analysed(sop_uids)  # the same instances again: no second SR
            return
        datasets = result_datasets(analysis)
        if self.deid:
            datasets = self._deidentify(analysis, datasets)
        self.store.save_analysis(analysis_key=key, study_uid=analysis.study_uid,
                                 series_uid=analysis.series_uid, model=model.algorithm.name,
                                 prediction=analysis.prediction.to_dict(),
                                 result_uids=[str(ds.SOPInstanceUID) for ds in datasets])
        self.outbox.enqueue(datasets, self.destination)
        self.store.mark_queued(key, sop_uids)
        self._audit(model, analysis, len(datasets))
        if analysis.prediction.ood:
            self.store.fail([], "ood", f"{model.algorithm.name}: input outside the training "
                            "data; no decision made (the SR says so)",
                            study_uid=analysis.study_uid, series_uid=analysis.series_uid)


def stored_analyses(store: Store, study_uid: str) -> list[SeriesAnalysis]:
    """The study's analyses as the store kept them (after a restart too), for ranking."""
    from meddx.inference.prediction import Prediction

    fields = set(Prediction.__dataclass_fields__)
    out = []
    for a in store.analyses():
        if a["study_uid"] != study_uid:
            continue
        pred = Prediction(**{k: v for k, v in a["prediction"].items() if k in fields})
        model = pred.model
        sources = tuple(r.path for r in store.series_instances(a["series_uid"]))
        out.append(SeriesAnalysis(study_uid=study_uid, series_uid=a["series_uid"],
                                  sources=sources, prediction=pred, algorithm=Algorithm(
                                      name=model["name"], version=model["version"],
                                      package_sha256=model["sha256"])))
    return out


def update_worklist(store: Store, study_uid: str) -> None:
    """Rank the study from all its analyses and store its worklist entry (the work folder's
    SQLite file, read by ``meddx dicom queue`` and ``worklist_json``)."""
    from meddx.dicom.worklist import rank, save_worklist

    analyses = stored_analyses(store, study_uid)
    if analyses:
        save_worklist(store.path, rank(analyses, salt=store.salt, include_uid=True))


def _read_reason(e: MeddxError) -> str:
    """An image the model cannot take (too small, wrong shape) vs one that cannot be read."""
    from meddx.errors import InputMismatchError

    return "no-matching-model" if isinstance(e, InputMismatchError) else "decode-failure"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def _to_grid(heat: np.ndarray, path: Path) -> np.ndarray:
    """A model-grid heat map resized to the instance's Rows × Columns, in [0, 1]."""
    head = dcmread(path, stop_before_pixels=True)
    return _resize(np.asarray(heat, np.float32), (int(head.Rows), int(head.Columns)))


def _resize(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    mode = "bilinear" if arr.ndim == 2 else "trilinear"
    out = torch.nn.functional.interpolate(t, size=shape, mode=mode, align_corners=False)[0, 0]
    return np.clip(out.numpy(), 0.0, 1.0)


def _slice_maps(heat: np.ndarray, shape: tuple[int, ...], sop_uids: list[str]
                ) -> tuple[tuple[str, np.ndarray], ...]:
    full = _resize(np.asarray(heat, np.float32), tuple(int(s) for s in shape))
    hottest = np.argsort(full.reshape(full.shape[0], -1).max(axis=1))[::-1][:_MAX_HEATMAPS_3D]
    return tuple((sop_uids[i], full[i]) for i in sorted(hottest))
