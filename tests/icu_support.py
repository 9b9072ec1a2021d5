"""Hand-written PhysioNet 2012 stay files and a small ICU package built from them (no bundled
data needed): enough for the predict/serve paths, where what matters is which decision rule
is applied and what the reader left out, not whether the risk is right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADER = ("Time,Parameter,Value\n00:00,RecordID,{rid}\n00:00,Age,{age}\n00:00,Gender,1\n"
          "00:00,Height,-1\n00:00,ICUType,3\n00:00,Weight,{weight}\n")


def write_stay(folder: Path, rid: int, body: str, age: int = 70, weight: int = 80) -> Path:
    """A stay file ``<rid>.txt`` with the usual descriptors and ``body`` (lines ending in \\n);
    the admission weight counts as an observation (``weight=-1``: missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rid}.txt"
    path.write_text(HEADER.format(rid=rid, age=age, weight=weight) + body)
    return path


def clean_body(hr: int = 80) -> str:
    return (f"00:30,HR,{hr}\n01:10,HR,{hr + 5}\n01:20,Lactate,2.1\n02:00,GCS,14\n"
            "03:00,MAP,75\n05:00,Temp,37.2\n")


def icu_package(out: Path, points: dict[str, dict[str, Any]], default: str) -> Any:
    """An untrained logistic ICU model whose card holds ``points`` (name → OperatingPoint
    fields) with ``default`` as its default decision rule."""
    import numpy as np
    import torch

    from meddx.modalities.ehr.features import bin_stay, fit_stats
    from meddx.modalities.ehr.io import read_physionet_stay
    from meddx.modalities.ehr.modality import EHRModality
    from meddx.models import build_network
    from meddx.package import ModelCard, OperatingPoint, save_package
    from meddx.tasks import TaskSpec

    folder = out / "train_stays"
    binned = [bin_stay(read_physionet_stay(write_stay(folder, 300000 + i, clean_body(70 + 7 * i),
                                                      age=40 + 9 * i)))
              for i in range(5)]
    stats = fit_stats(np.stack([b.values for b in binned]), np.stack([b.static for b in binned]))
    modality = EHRModality()
    spec = modality._input_spec(stats, EHRModality.Options())
    task = TaskSpec(kind="binary", class_names=["survived", "died"], positive_class="died",
                    label_values=[0, 1])
    torch.manual_seed(0)
    net = build_network("logistic", num_outputs=task.num_outputs,
                        spec=modality.network_spec(spec), options={})
    ops = {name: OperatingPoint(positive_class="died", **fields) for name, fields in
           points.items()}
    card = ModelCard(name="icu-tiny", modality="ehr", task=task,
                     network={"name": "logistic", "options": {}}, preprocessing=spec,
                     operating_points=ops, default_operating_point=default)
    return save_package(out / "model", net.eval(), card)
