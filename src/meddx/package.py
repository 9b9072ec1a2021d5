"""ModelPackage: the unit of deployment.

A package is a folder::

    weights.safetensors   fp32 weights (never a pickle)
    card.json             what the model is, was trained on, and how it performs (ModelCard)
    manifest.json         sha256 of every other file, the card included
    model.onnx            optional, written by ``meddx export``
    model.int8.onnx       optional statically quantised variant

Loading checks every sha256 in the manifest; a changed, missing or unlisted weights file is a
:class:`~meddx.errors.ModelError` naming it. A modality may store more than the weights in a
sub-folder (a slide model carries its tile encoder in ``encoder/``; see
:meth:`~meddx.modalities.base.Modality.package_preprocessing`): the manifest lists those files
by their relative path, so loading and signing cover them as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from meddx.errors import ConfigError, ModelError
from meddx.sideinputs import SideInputFusion
from meddx.signing import member_name_ok, sha256_file, write_manifest
from meddx.tasks import TaskSpec

__all__ = [
    "ModelCard",
    "OperatingPoint",
    "Calibration",
    "Conformal",
    "OODDetector",
    "Histogram",
    "TrainingReference",
    "ModelPackage",
    "save_package",
    "load_package",
    "sha256_file",
]

logger = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
CARD = "card.json"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # meddx.signing writes it beside the manifest; never listed in it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatingPoint(_Strict):
    """A decision threshold on the (calibrated) probability of ``positive_class``."""

    method: str  # "sensitivity" | "specificity" | "youden" | "balanced"
    threshold: float
    positive_class: str
    target: float | None = None
    fitted_on: str = "calib"
    calib_sensitivity: float | None = None
    calib_specificity: float | None = None
    calib_ppv: float | None = None


class Calibration(_Strict):
    """Temperature scaling of the logits, fitted on the calibration split."""

    method: str = "temperature"
    temperature: float = 1.0
    fitted_on: str = "calib"
    ece_before: float | None = None
    ece_after: float | None = None
    brier_before: float | None = None
    brier_after: float | None = None


class Conformal(_Strict):
    """Split-conformal prediction sets fitted on the calibration split.

    ``threshold`` is q̂ (one value; multilabel: one per label). LAC includes class k when
    ``1 - p_k <= q̂``; APS includes classes in descending probability until their mass reaches q̂.
    """

    method: str = "lac"
    alpha: float = 0.1
    threshold: float | list[float]
    fitted_on: str = "calib"
    n_calib: int | None = None


class OODDetector(_Strict):
    """Out-of-distribution detector fitted at training time (see :mod:`meddx.inference.ood`).

    ``method`` "mahalanobis": class-conditional Gaussians (means and shared precision in
    ``file``) on the input of the network's last linear layer ``layer``, fitted on ``fitted_on``;
    "energy": ``-logsumexp(logits)``, no file. An input is out of distribution when its score is
    above ``threshold``, chosen on ``threshold_fitted_on`` for the stated ``false_alarm`` rate.

    ``threshold_scores`` "calib": the conformal quantile of the ``n_calib`` calib scores;
    "crossfit": of those pooled with ``n_crossfit`` out-of-fold train scores (``folds`` folds),
    ``n_threshold`` in all; ``crossfit_shift_p``: the Mann-Whitney p of calib vs those train
    scores (where "auto" found them different, the threshold is calib's alone). ``expected_false_alarm`` and ``false_alarm_interval`` (95%) say
    what rate this threshold realises on new in-distribution inputs, given ``n_threshold``.
    Cards written before these fields leave them None (their threshold came from calib).
    """

    method: str  # "mahalanobis" | "energy"
    threshold: float
    false_alarm: float
    layer: str | None = None
    feature_dim: int | None = None
    file: str | None = None
    fitted_on: str | None = "train"
    threshold_fitted_on: str = "calib"
    n_fit: int | None = None
    n_calib: int | None = None
    calib_flagged: float | None = None
    shrinkage: float | None = None
    threshold_scores: str = "calib"  # "calib" | "crossfit" (the scores used)
    folds: int | None = None
    n_crossfit: int | None = None
    crossfit_shift_p: float | None = None
    crossfit_flagged: float | None = None
    n_threshold: int | None = None
    expected_false_alarm: float | None = None
    false_alarm_interval: list[float] | None = None


class Histogram(_Strict):
    """A distribution summarised for drift checks: inner bin ``edges`` (quantiles of the
    reference, so bins hold about equal shares), the reference ``fractions`` per bin
    (``len(edges) + 1`` of them), and its mean, standard deviation and quantiles."""

    edges: list[float]
    fractions: list[float]
    mean: float
    std: float
    quantiles: dict[str, float] = Field(default_factory=dict)


class TrainingReference(_Strict):
    """What the model saw on the calibration split, for monitoring (``meddx monitor``).

    ``risk`` is the calibrated probability of ``risk_of`` (the positive class, or
    ``"top-class"``: the top class's probability when the task names none); ``inputs`` holds
    per-input statistics of the model input tensor (``mean``, ``std``, ``extreme``: the
    fraction of values at the tensor's own minimum or maximum), empty when the modality's
    inputs are not tensors.
    """

    fitted_on: str = "calib"
    n: int
    risk_of: str
    risk: Histogram
    n_inputs: int = 0
    inputs: dict[str, Histogram] = Field(default_factory=dict)


class ModelCard(_Strict):
    """Everything a user, reviewer or service needs to know about a packaged model."""

    schema_version: int = 1
    name: str
    version: str = "1.0.0"
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    meddx_version: str = ""
    modality: str
    task: TaskSpec
    network: dict[str, Any]
    preprocessing: dict[str, Any]
    calibration: Calibration | None = None
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    default_operating_point: str | None = None
    conformal: Conformal | None = None
    ood: OODDetector | None = None
    reference: TrainingReference | None = None
    # tabular inputs beside the main one and their late fusion (None: the main input only)
    side_inputs: SideInputFusion | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    training_data: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    intended_use: str = "Research on medical deep learning; not for diagnosis."
    research_only: bool = True
    license: str = "unknown"

    @property
    def operating_point(self) -> OperatingPoint | None:
        if self.default_operating_point is None:
            return None
        return self.operating_points.get(self.default_operating_point)


class ModelPackage:
    """A loaded, verified package: the card, the fp32 state dict and the folder.

    Use :func:`load_package` to read one and :func:`save_package` to write one.
    """

    def __init__(self, path: Path, card: ModelCard, state_dict: dict[str, torch.Tensor],
                 manifest: dict[str, str]) -> None:
        self.path = path
        self.card = card
        self.state_dict = state_dict
        self.manifest = manifest
        self.signer: str | None = None  # signing key's fingerprint, when loaded with ``trust``

    @property
    def sha256(self) -> str:
        """Digest of the weights: identifies exactly which model answered."""
        return self.manifest[WEIGHTS]

    @property
    def onnx_path(self) -> Path | None:
        p = self.path / "model.onnx"
        return p if "model.onnx" in self.manifest and p.exists() else None

    def build_model(self) -> torch.nn.Module:
        """The network with the package's weights, in eval mode, fp32."""
        from meddx.modalities import get_modality
        from meddx.models import build_network

        modality = get_modality(self.card.modality)
        spec = modality.network_spec(self.card.preprocessing)
        model = build_network(
            self.card.network["name"],
            num_outputs=self.card.task.num_outputs,
            spec=spec,
            options=self.card.network.get("options", {}),
        )
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise ModelError(
                "weights do not fit the network named in the card", path=str(self.path)
            ) from e
        return model.eval()

    def update_card(self, **fields: Any) -> None:
        """Change card fields and rewrite the card and manifest."""
        data = self.card.model_dump(mode="json")
        data.update({k: v for k, v in fields.items()})
        self.manifest = _write_card_and_manifest(self.path, ModelCard.model_validate(data))
        self.card = _loaded_card(self.path, ModelCard.model_validate_json(
            (self.path / CARD).read_text()), self.manifest)

    def add_file(self, name: str) -> None:
        """Record an extra file (e.g. ``model.onnx``) written into the package folder."""
        self.manifest = _write_card_and_manifest(self.path, self.card)


def _modality_of(card: ModelCard) -> Any:
    """The card's modality, or None for a name no installed modality registers (such a card
    still loads; building its network names the problem)."""
    from meddx.modalities import get_modality

    try:
        return get_modality(card.modality)
    except ConfigError:
        return None


def _loaded_card(root: Path, card: ModelCard, manifest: dict[str, str]) -> ModelCard:
    modality = _modality_of(card)
    if modality is None:
        return card
    spec = modality.loaded_preprocessing(card.preprocessing, root, manifest)
    return card if spec is card.preprocessing else card.model_copy(update={"preprocessing": spec})


def _write_card_and_manifest(path: Path, card: ModelCard) -> dict[str, str]:
    modality = _modality_of(card)
    if modality is not None:  # what the model needs beyond its weights is copied in first
        card = card.model_copy(update={
            "preprocessing": modality.package_preprocessing(card.preprocessing, path)})
    (path / CARD).write_text(json.dumps(card.model_dump(mode="json"), indent=2))
    return write_manifest(path)


def save_package(path: str | Path, model: torch.nn.Module, card: ModelCard) -> ModelPackage:
    """Write weights (fp32 safetensors), the card and the manifest into ``path``."""
    from meddx.version import __version__

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    if not card.meddx_version:
        card = card.model_copy(update={"meddx_version": __version__})
    _write_card_and_manifest(out, card)
    return load_package(out)


def load_package(path: str | Path, trust: Iterable[Any] | None = None) -> ModelPackage:
    """Read and verify a package folder. Never unpickles anything.

    Args:
        path: the package folder.
        trust: Ed25519 public keys (PEM files or key objects), one of which must have signed
            the package (``meddx sign``; :func:`meddx.signing.verify_package`); None skips the
            signature check. The signer's key fingerprint is then ``package.signer``.

    Raises:
        ModelError: folder, card, manifest or weights missing; a sha256 that does not match;
            with ``trust``: unsigned, signed by an untrusted key, or changed after signing.
        ConfigError: with ``trust``: no key given, or one cannot be read.
    """
    root = Path(path)
    signer = None
    if trust is not None:
        from meddx.signing import verify_package

        signer = verify_package(root, trust)
    if not root.is_dir():
        raise ModelError(f"no model package at {root}", path=str(root),
                         hint="train one with `meddx train` or give the package folder")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ModelError("package has no manifest.json", path=str(root))
    try:
        manifest: dict[str, str] = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError("manifest.json is not valid JSON", path=str(manifest_path)) from e
    for required in (WEIGHTS, CARD):
        if required not in manifest:
            raise ModelError(f"manifest does not list {required}", path=str(root))
    for name, digest in manifest.items():
        if not member_name_ok(name):
            raise ModelError(f"manifest lists {name!r}, which is not a file inside the package",
                             path=str(manifest_path))
        f = root / name
        if not f.is_file():
            raise ModelError(f"package file {name} is missing", path=str(f))
        if sha256_file(f) != digest:
            raise ModelError(
                f"package file {name} was changed (sha256 mismatch)",
                path=str(f),
                hint="re-export the package or restore the original file",
            )
    try:
        card = ModelCard.model_validate_json((root / CARD).read_text())
    except ValidationError as e:
        raise ModelError(f"card.json is invalid: {e}", path=str(root / CARD)) from e
    card = _loaded_card(root, card, manifest)
    state = load_file(str(root / WEIGHTS))
    package = ModelPackage(root, card, state, manifest)
    package.signer = signer
    return package
