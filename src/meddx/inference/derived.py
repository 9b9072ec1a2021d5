"""A package's model of derived features (an ECG's rhythm features → class log-probabilities).

Trained with scikit-learn (:func:`meddx.training.sideinputs.fit_derived_model`), stored in the
package as ONNX (``skl2onnx``; never a pickle) and listed in its manifest, and run here with
``onnxruntime``: the same runtime at fitting time (calib) and at prediction time, so the fused
block cannot drift between them. Missing features (NaN) go to the branch the trees learnt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddx.errors import ModelError

__all__ = ["DerivedModel"]


class DerivedModel:
    """An ONNX classifier over derived features, from a file (``path``) or its serialised
    bytes (``model``); :meth:`log_proba` gives (n, classes)."""

    def __init__(self, path: str | Path | None = None, model: bytes | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - the ecg extra installs it
            raise ModelError("this package fuses derived features with an ONNX model; "
                             "install onnxruntime", hint="pip install 'meddx[ecg]'") from e
        if model is None:
            path = Path(str(path))
            if not path.is_file():
                raise ModelError("the package's derived-feature model is missing", path=str(path))
            model = path.read_bytes()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.output = "probabilities" if "probabilities" in names else names[-1]

    def log_proba(self, x: np.ndarray) -> np.ndarray:
        """Class log-probabilities of rows of raw features (NaN: missing)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            return np.zeros((len(x), 0))
        p = self.session.run([self.output], {self.input: x})[0]
        return np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1.0))
