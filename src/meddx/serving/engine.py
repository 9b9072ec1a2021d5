"""The models a service holds, and one call that turns uploads into answers.

:class:`ModelHub` loads each package once (sha256-verified), refuses research-only packages
unless the service runs with ``research_use``, warms each model up, and looks models up by name
(unknown names get a 404 with a did-you-mean). :meth:`ServedModel.answer` checks every upload
before decoding it (content type, pixel count), runs the Predictor, and renders Grad-CAM
overlays with the fp32 torch weights when asked — or, for other modalities, the
modality's explanation plot (PNG, rendered in a private temporary folder that is removed at
once) and a short numeric summary of it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, DataError, MeddxError, NotFoundError
from meddx.redaction import reading_user_data
from meddx.registry import suggest
from meddx.serving import context
from meddx.serving.audit import sha256_bytes
from meddx.serving.inputs import Upload, check_upload
from meddx.serving.settings import ALL_MODELS, ServeSettings

__all__ = ["Answer", "ServedModel", "ModelHub"]

logger = logging.getLogger(__name__)

# side inputs of a request: one record (or None) per input, and where they came from
SideRecords = tuple[list[Any], str] | None


@dataclass
class Answer:
    """One input's answer: the Prediction, the input's sha256, and rendered PNGs.

    Attributes:
        overlay_png: images: the Grad-CAM overlay.
        image_png: images: the model's view of the input.
        explanation_png: other modalities: the explainer's own plot (e.g. a sequence logo or
            a trace with its attribution strip).
        extra: ``explained_class`` and, beside ``explanation_png``, ``explanation`` (the
            explainer's numeric summary).
    """

    prediction: Any
    input_sha256: str
    overlay_png: bytes | None = None
    image_png: bytes | None = None
    explanation_png: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _plot_png(explainer: Any, sample: Any, attribution: Any, label: str | None) -> bytes:
    """The explainer's ``plot`` as PNG bytes; the file lives only inside this call."""
    with tempfile.TemporaryDirectory(prefix="meddx-explain-") as tmp:
        return Path(explainer.plot(sample, attribution, Path(tmp) / "explanation.png",
                                   label)).read_bytes()


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """Around every read of user data: third-party messages are withheld from the log
    (:func:`meddx.redaction.reading_user_data`), and a reader's unexpected exception becomes a
    422 naming only its class — its text, and the traceback a 500 would log, may quote the
    input."""
    with reading_user_data():
        try:
            yield
        except MeddxError:
            raise
        except Exception as e:  # noqa: BLE001 — a reader's own failure on a damaged input
            logger.warning("a reader failed on an input: %s (answered 422)", type(e).__name__)
            raise DataError(f"the input could not be read ({type(e).__name__})",
                            hint="check the file; it may be truncated or corrupt") from None


_KEPT_META = ("basis", "patient", "encounter", "n_observations", "below_training_minimum")


class ServedModel:
    """A loaded Predictor with its serving metadata.

    Attributes:
        name: the card's name (the URL segment).
        predictor: the :class:`meddx.inference.Predictor`.
        research_only: the card's flag (then every answer carries the notice).
    """

    def __init__(self, predictor: Any, settings: ServeSettings) -> None:
        self.predictor = predictor
        self.card = predictor.card
        self.name = self.card.name
        self.settings = settings
        self.research_only = bool(self.card.research_only)
        self.modality = self.card.modality
        self.ready = False
        self._explainer: Any = None
        self._explain_lock = threading.Lock()

    @property
    def info(self) -> dict[str, str]:
        return {"name": self.name, "version": self.card.version,
                "sha256": self.predictor.package.sha256, "backend": self.predictor.backend}

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` lists: the card, minus training internals."""
        card = self.card.model_dump(mode="json")
        card.pop("training", None)
        return {**self.info, "modality": self.modality, "research_only": self.research_only,
                "intended_use": self.card.intended_use, "license": self.card.license,
                "operating_point": self.predictor.operating_point_name, "card": card,
                # what the model takes beside its input (name, unit, allowed values)
                "side_inputs": [] if self.card.side_inputs is None
                else self.card.side_inputs.expects()}

    def warmup(self) -> None:
        """Run the network once on the builder's example input (first calls are slow)."""
        from meddx.models import MODELS

        try:
            builder = MODELS.get(self.card.network["name"])
            spec = self.predictor.modality.network_spec(self.card.preprocessing)
            x = builder.example_input(spec, 1)
            self.predictor.logits(x)
        except Exception as e:  # noqa: BLE001 — warm-up is best effort, the model still serves
            logger.warning("warm-up of %s skipped: %s", self.name, e)
        try:  # the explainer too (imports captum/matplotlib): loaded before gc.freeze()
            with self._explain_lock:
                if self._explainer is None:
                    self._explainer = self.predictor.explainer()
        except Exception as e:  # noqa: BLE001 — built again on the first explain request
            logger.debug("explainer of %s not built at warm-up: %s", self.name, e)
        self.ready = True

    # ------------------------------------------------------------------ answer
    def read(self, uploads: list[Upload]) -> list[Any]:
        """Check and decode uploads into Samples (content type, pixel and decoded-size caps,
        modality reader); third-party messages raised meanwhile are withheld from the log."""
        modality = self.predictor.modality
        with _reading():
            pixels = [check_upload(u, modality, self.settings.max_image_pixels,
                                   self.settings.max_decoded_bytes) for u in uploads]
            # files that make one input together (a WFDB header and its signal) are grouped
            # by the modality
            sources = modality.group_uploads([{"name": u.name, "data": u.data} for u in uploads])
            samples = [self.predictor.read(s) for s in sources]
            if len(pixels) != len(samples):  # files grouped into one input: no per-file size
                pixels = [None] * len(samples)
            for s, n in zip(samples, pixels, strict=True):
                modality.check_served(s, self.card.preprocessing, n)
        return samples

    def answer(self, uploads: list[Upload], explain: bool = False,
               side_inputs: SideRecords = None) -> list[Answer]:
        """Predict for uploads; with ``explain`` add the Grad-CAM overlay of each input;
        ``side_inputs``: one record per input (and where they came from) for a model that
        takes them."""
        samples = self.read(uploads)
        digests = [sha256_bytes(u.data) for u in uploads]
        if len(digests) != len(samples):  # grouped uploads: one digest of all parts
            digests = [sha256_bytes(b"".join(u.data for u in uploads))] * len(samples)
        return self.answer_samples(samples, digests, explain, side_inputs)

    def answer_sources(self, sources: list[Any], digests: list[str],
                       explain: bool = False, side_inputs: SideRecords = None) -> list[Answer]:
        """Predict for already-decoded sources (FHIR resources, strings, arrays)."""
        with _reading():
            samples = [self.predictor.read(s) for s in sources]
            for s in samples:
                self.predictor.modality.check_served(s, self.card.preprocessing, None)
        return self.answer_samples(samples, digests, explain, side_inputs)

    def answer_samples(self, samples: list[Any], digests: list[str],
                       explain: bool, side_inputs: SideRecords = None) -> list[Answer]:
        if side_inputs is not None:
            from meddx.inference import attach_side_inputs

            records, source = side_inputs
            if len(records) != len(samples):
                raise DataError(f"{len(records)} side-input records for {len(samples)} inputs",
                                hint="give one object of side inputs per input")
            for s, rec in zip(samples, records, strict=True):
                attach_side_inputs(s, rec, source)
        for i, s in enumerate(samples):
            s.id = str(i)  # never echo file names (they may name a patient)
        context.note_inputs([s.tensor for s in samples])  # for drift monitoring (audit log)
        preds = self.predictor.predict_samples(samples, explain=False)
        for p, s in zip(preds, samples, strict=True):  # provenance the FHIR output needs
            for key in _KEPT_META:
                if key in s.meta and key not in p.notes:
                    p.notes[key] = s.meta[key]
        answers = [Answer(p, d) for p, d in zip(preds, digests, strict=True)]
        if explain:
            self._explain(samples, answers)
        return answers

    def _explain(self, samples: list[Any], answers: list[Answer]) -> None:
        """Images: Grad-CAM overlay PNGs. Others: the modality's explainer, its plot as a PNG
        and its summary where it has them; findings in words (EHR) go to
        ``prediction.notes["findings"]``."""
        names = self.predictor.task.class_names
        with self._explain_lock:  # the explainer hooks one network copy: one at a time
            if self._explainer is None:
                self._explainer = self.predictor.explainer()
            for s, a in zip(samples, answers, strict=True):
                p = a.prediction
                target = self.card.task.positive_class or p.label
                if isinstance(p.decision, str) and p.decision in names:
                    target = p.decision
                index = names.index(target) if target in names else None
                result = self._explainer.explain(s, index)
                a.extra["explained_class"] = None if index is None else names[index]
                averaged = getattr(self._explainer, "averaged", None)
                if averaged:  # an ensemble or TTA package: say what the map is the mean of
                    a.extra["explanation"] = {"averaged_over": dict(averaged)}
                if isinstance(result, tuple):  # (findings in words, attributions)
                    p.notes["findings"] = list(result[0])[:5]
                    p.explanation = result[1]
                    continue
                p.explanation = result
                if hasattr(self._explainer, "overlay_png"):  # a heat map over the input
                    a.overlay_png = self._explainer.overlay_png(s, p.explanation)
                    a.image_png = self._explainer.preview_png(s)
                    continue
                label = a.extra["explained_class"]
                if hasattr(self._explainer, "plot"):
                    a.explanation_png = _plot_png(self._explainer, s, result, label)
                if hasattr(self._explainer, "summary"):
                    a.extra["explanation"] = self._explainer.summary(s, result)


def _load(path: str | Path, settings: ServeSettings) -> Any:
    from meddx.inference import load_model

    return load_model(path, backend=settings.backend, threads=settings.threads)


def _trusted_keys(settings: ServeSettings) -> list[Any]:
    from meddx.signing import load_public_key

    return [load_public_key(p) for p in settings.trust_keys]


def _verify_signed(item: Any, trusted: list[Any]) -> None:
    """Refuse a package not signed by a trusted key (ModelError naming it and why)."""
    from meddx.errors import ModelError
    from meddx.signing import verify_package

    path = item if isinstance(item, str | Path) else getattr(
        getattr(item, "package", None), "path", None)
    if path is None:
        raise ModelError("a model given without its package folder cannot be checked against "
                         "--trust-key", hint="serve the package folder")
    verify_package(path, trusted)


class ModelHub:
    """All models of one service, by name.

    Args:
        packages: package folders, or ready Predictors.
        settings: service settings (``research_use``, ``backend``, ``threads``).

    Raises:
        ConfigError: two packages share a name, or a research-only package without
            ``research_use``; a ``trust_keys`` file cannot be read.
        ModelError: with ``trust_keys``, a package that is unsigned, signed by another key or
            changed since it was signed.
    """

    def __init__(self, packages: list[Any], settings: ServeSettings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        trusted = _trusted_keys(settings)
        for item in packages:
            predictor = item
            if trusted:
                _verify_signed(item, trusted)
            if isinstance(item, str | Path):
                predictor = _load(item, settings)
            served = ServedModel(predictor, settings)
            if served.name in self.models:
                raise ConfigError(f"two packages are named '{served.name}'",
                                  hint="rename one (its card's name) before serving both")
            if served.research_only and not settings.research_use:
                raise ConfigError(
                    f"model '{served.name}' is for research only",
                    hint="start the service with --research-use to serve it; every answer will "
                         "then say 'research use only — not for diagnosis'")
            self.models[served.name] = served
            _decide_at(served, settings.operating_points)
            logger.info("serving %s %s (%s backend, operating point %s)", served.name,
                        served.card.version, predictor.backend,
                        predictor.operating_point_name)
        unknown = sorted(set(settings.operating_points) - set(self.models) - {ALL_MODELS})
        if unknown:
            raise ConfigError(f"--operating-point names model(s) not served: "
                              f"{', '.join(unknown)}",
                              hint="served: " + ", ".join(self.models))

    def get(self, name: str) -> ServedModel:
        """The model called ``name`` (404 with a suggestion otherwise)."""
        if name not in self.models:
            raise NotFoundError(f"unknown model '{name}'" + suggest(name, list(self.models)),
                                hint="GET /v1/models lists the models served")
        return self.models[name]

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())

    @property
    def any_research_only(self) -> bool:
        return any(m.research_only for m in self.models.values())

    def warmup(self) -> None:
        """Warm every model, then move everything loaded so far out of the garbage collector's
        reach (``gc.freeze``): a request that parses a 1 MB FHIR prefetch allocates tens of
        thousands of containers, which triggers full collections; each walked the ~270,000
        objects of torch, FastAPI and the models (≈150 ms, the whole p99 of an EHR call).
        Frozen objects are never collected, which suits objects that live as long as the
        service. Then :func:`tune_gc`."""
        import gc

        for m in self.models.values():
            try:
                m.warmup()
            except MeddxError as e:
                logger.warning("warm-up failed for %s: %s", m.name, e)
        _warm_request_path()
        gc.collect()
        gc.freeze()
        tune_gc()


def _decide_at(served: ServedModel, points: dict[str, str]) -> None:
    """Apply this deployment's operating point to one model (``--operating-point``).

    A model named explicitly must have the point; a bare NAME applies to every model that
    has operating points (a multiclass or regression model has none and keeps deciding as
    before).

    Raises:
        ConfigError: the model's card has no such operating point (the message lists them).
    """
    name = points.get(served.name)
    if name is None:
        name = points.get(ALL_MODELS)
        if name is None or not served.card.operating_points:
            return
    served.predictor.use_operating_point(name)


GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Collect the young generation every 10,000 net allocations instead of Python's 700.

    A CDS call with a 1 MB FHIR prefetch builds ~100,000 short-lived, acyclic JSON objects
    that reference counting frees anyway. At Python's default (700, 10, 10) each such call ran
    ~25 young, 2.3 middle and 0.2 full collections — the full ones 20-25 ms each, since they
    walk the request's live objects too — ≈6 ms of CPU a call and most of its latency tail.
    At 10,000: ~1 young collection a call (0.5-0.8 ms in all). One client, 200 calls of the benchmark's
    1,494-Observation stay with drivers, interleaved: p99 78 and 84 ms against 114 and 102 ms
    (``benchmarks/serve_load.py`` measures the default beside it in every run).
    """
    import gc

    gc.set_threshold(*GC_THRESHOLDS)


def _warm_request_path() -> None:
    """Import what the first requests would import lazily (FHIR models, validators), so that
    it is loaded before the collector is frozen."""
    try:
        from fhir.resources.R4B import get_fhir_model_class

        for rtype in ("Bundle", "RiskAssessment", "DiagnosticReport", "Observation", "Media",
                      "Device", "Binary", "DocumentReference", "Patient", "Encounter"):
            get_fhir_model_class(rtype)
    except Exception as e:  # noqa: BLE001 — best effort: the service works without it
        logger.debug("request path warm-up skipped: %s", e)
