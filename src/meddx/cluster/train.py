"""Training on a Ray cluster: ``meddx train CONFIG --ray ADDRESS --workers N``.

The same Lightning module as a local run (:func:`meddx.training.prepare_fit`) trains under
Ray Train's ``TorchTrainer``: one process per worker, DDP between them (gloo on CPU, NCCL on
GPU) through ``ray.train.lightning``'s ``RayDDPStrategy`` and ``RayLightningEnvironment``.
``train.batch_size`` stays the *global* batch: each of N workers takes ``batch_size / N``, so
one optimiser step sees as many cases as in a local run of the same config.

Checkpoints go to shared storage (``RunConfig(storage_path=...)``: a folder every node sees,
or a URI such as ``s3://bucket/runs``) at the end of every epoch with the validation figure;
Ray keeps the best two and the latest. A worker (or its node) that dies restarts the worker
group, which resumes from the latest checkpoint (``FailureConfig(max_failures=...)``).

After training, rank 0 alone restores the best checkpoint, packages the network and makes
the post-hoc fits on ``calib`` exactly as a local run (:func:`meddx.training.package_fit`),
then reports the run folder (``model/``, ``splits.json``, ``logs/``) as the run's last
checkpoint: the package travels to the driver through the same storage, and the driver
writes it to ``<out>/model`` and verifies it with :func:`meddx.package.load_package`.

Ensembles (``model.options.members`` > 1: seed ensembles, the GRU-D ensemble) train their
members as parallel Ray tasks, each a standard single-process run; the driver joins them and
makes the post-hoc fits once (:func:`meddx.training.join_members`), as a local ensemble does.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from meddx.config import ExperimentConfig, dump_config
from meddx.errors import ConfigError, ModelError
from meddx.package import ModelPackage, load_package
from meddx.training import (
    as_config,
    ensemble_options,
    join_members,
    load_bundle,
    member_bundle,
    member_config,
    package_fit,
    prepare_fit,
    restore_best,
    save_splits,
    train,
    trainer_options,
)

__all__ = ["train_on_ray"]

logger = logging.getLogger(__name__)

CKPT = "checkpoint.ckpt"  # the Lightning file inside a RayTrainReportCallback checkpoint
PACKAGED = "packaged"  # metric set on the run's final report (the run folder with the package)


def train_on_ray(config: ExperimentConfig | str | Path | dict, out: str | Path | None = None,
                 address: str | None = None, workers: int = 2, storage: str | None = None,
                 max_failures: int = 2, resume: bool = False) -> ModelPackage:
    """Train the configured model on a Ray cluster and write the run folder at ``out``.

    Args:
        config: config object, YAML path or dict (as for :func:`meddx.training.train`).
        out: run folder (default ``runs/<config name>``); the package lands in ``out/model``.
        address: the Ray cluster (``host:port``, ``auto``, ``ray://…``); None: ``RAY_ADDRESS``
            or a Ray started on this machine.
        workers: DDP processes (Ray Train workers); for an ensemble, members trained at once
            is up to Ray's scheduler and this is ignored.
        storage: checkpoint storage every node can reach (folder or URI); default
            ``<out>/ray``, which is only shared when every node sees this machine's disk.
        max_failures: worker-group restarts (or task retries) before the run fails.
        resume: continue the run named like the config in ``storage`` from its last
            checkpoint (without it, an earlier run of that name there is removed first).

    Raises:
        ConfigError: bad worker count or batch split, no Ray, unreachable cluster.
        ModelError: training failed on the cluster after ``max_failures`` restarts.
    """
    from meddx.cluster import connect

    cfg = _portable(as_config(config))
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}", hint="--workers 2")
    if max_failures < 0:
        raise ConfigError(f"max_failures must be >= 0, got {max_failures}")
    run = Path(out or Path("runs") / cfg.name).absolute()
    run.mkdir(parents=True, exist_ok=True)
    members = cfg.model.options.get("members", 1)
    ensemble = isinstance(members, int) and members > 1
    if not ensemble:
        _per_worker_batch(cfg, workers)  # checked before a cluster is reached
    from meddx.cluster import require_ray

    joined_here = not require_ray().is_initialized()
    ray = connect(address)
    try:
        if ensemble:
            return _train_members(ray, cfg, run, members, max_failures, resume)
        return _train_ddp(ray, cfg, run, workers, storage or str(run / "ray"), max_failures,
                          resume)
    finally:
        if joined_here:  # leave the process as it was: a later ray.init() must not clash
            ray.shutdown()


def _portable(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config as every node must read it: a relative ``data.path`` made absolute (a Ray
    worker's working folder is not this one)."""
    path = cfg.data.path
    if path and "://" not in path and not Path(path).is_absolute():
        cfg = cfg.updated(**{"data.path": str(Path(path).absolute())})
    return cfg


def _data_env() -> dict[str, str]:
    """Where this machine finds bundled data, for the nodes (``MEDDX_DATA``): the same folder
    must be mounted at the same path on every node."""
    import os

    from meddx.catalog import data_roots

    if os.environ.get("MEDDX_DATA"):
        return {"MEDDX_DATA": os.environ["MEDDX_DATA"]}
    found = [r for r in data_roots() if r.is_dir()]
    return {"MEDDX_DATA": str(found[0])} if found else {}


def _on_node(payload: dict[str, Any]) -> ExperimentConfig:
    """Set up a Ray worker or task for a run: the driver's data location, the config."""
    import os

    for key, value in payload.get("env", {}).items():
        os.environ.setdefault(key, value)
    cfg = ExperimentConfig.model_validate(payload["config"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return cfg


def _per_worker_batch(cfg: ExperimentConfig, workers: int) -> int:
    batch = cfg.train.batch_size
    if batch % workers:
        raise ConfigError(f"train.batch_size {batch} does not split evenly over {workers} "
                          "workers (it is the global batch: each worker takes an equal share)",
                          hint=f"use a batch size that is a multiple of {workers}, e.g. "
                               f"{batch - batch % workers or workers}")
    return batch // workers


def _train_ddp(ray: Any, cfg: ExperimentConfig, run: Path, workers: int, storage: str,
               max_failures: int, resume: bool) -> ModelPackage:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not resume:
        _clear_run(storage, cfg.name)
    dump_config(cfg, run / "config.yaml")
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "env": _data_env(),
                           "workers": workers, "batch_size": _per_worker_batch(cfg, workers)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus,
                                     resources_per_worker={"CPU": cfg.train.threads or 1}),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage,
            # the best two and the latest (Ray always keeps it): the final report (the package,
            # scored with the best figure) ties the best epoch and must not push it out
            checkpoint_config=CheckpointConfig(num_to_keep=2,
                                               checkpoint_score_attribute=cfg.train.monitor,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures)),
    )
    logger.info("training %s on Ray: %d workers (%s), checkpoints in %s", cfg.name, workers,
                "NCCL on GPU" if gpus else "gloo on CPU", storage)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError carries the workers' tracebacks
        raise ModelError(f"training on the Ray cluster failed: {e}",
                         hint=f"the checkpoints are in {storage}; rerun with --resume to "
                              "continue from the last one") from e
    if result.checkpoint is None or not result.metrics.get(PACKAGED):
        raise ModelError("the Ray run ended without a package",
                         hint=f"see the run's logs in {storage}/{cfg.name}")
    return _fetch_run_folder(result.checkpoint, run)


def _clear_run(storage: str, name: str) -> None:
    """A fresh run must not resume an earlier run of the same name from its snapshot."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage
                                              else str(Path(storage).absolute()))
    folder = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
        logger.warning("starting a new run: removing the earlier run %s in %s "
                       "(use --resume to continue it instead)", name, storage)
        fs.delete_dir(folder)


def _fetch_run_folder(checkpoint: Any, run: Path) -> ModelPackage:
    """Copy the final checkpoint (rank 0's run folder) into ``run`` and verify the package."""
    with tempfile.TemporaryDirectory(dir=run, prefix=".fetch-") as tmp:
        checkpoint.to_directory(tmp)
        for item in sorted(Path(tmp).iterdir()):
            target = run / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(item), target)
    package = load_package(run / "model")
    logger.info("saved model package to %s", package.path)
    return package


def _worker_loop(payload: dict[str, Any]) -> None:
    """One Ray Train worker: the local run's module and loaders under Ray's DDP."""
    import lightning as L
    import ray.train
    from ray.train.lightning import RayTrainReportCallback

    cfg = _on_node(payload)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    bundle = load_bundle(cfg)
    fit = prepare_fit(cfg, bundle, batch_size=payload["batch_size"])
    latest = ray.train.get_checkpoint()
    if latest is not None and _is_packaged(latest):
        return  # restarted after rank 0 reported the package: nothing left to do
    report = RayTrainReportCallback()
    try:
        _fit_and_package(cfg, bundle, fit, latest, report, payload)
    finally:  # Ray's callback leaves an empty folder per rank in the temp dir
        shutil.rmtree(report.tmpdir_prefix, ignore_errors=True)


def _fit_and_package(cfg: ExperimentConfig, bundle: Any, fit: Any, latest: Any, report: Any,
                     payload: dict[str, Any]) -> None:
    import lightning as L
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    with tempfile.TemporaryDirectory(prefix="meddx-ray-") as tmp:
        trainer = prepare_trainer(L.Trainer(
            devices="auto", strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
            **trainer_options(cfg, Path(tmp), False, [report])))
        start, resumed_from = time.perf_counter(), None
        if latest is None:
            trainer.fit(fit.module, fit.train_loader, fit.val_loader)
        else:
            with latest.as_directory() as folder:
                resumed_from = int(torch.load(Path(folder) / CKPT, map_location="cpu",
                                              weights_only=True)["epoch"])
                logger.info("resuming from the checkpoint of epoch %d", resumed_from)
                trainer.fit(fit.module, fit.train_loader, fit.val_loader,
                            ckpt_path=str(Path(folder) / CKPT), weights_only=True)
        wall = time.perf_counter() - start
        ray_record = {"workers": payload["workers"], "batch_per_worker": payload["batch_size"],
                      "backend": "nccl" if torch.cuda.is_available() else "gloo",
                      "resumed_from_epoch": resumed_from}
        _package_on_rank_zero(cfg, bundle, fit, Path(tmp), int(trainer.current_epoch), wall,
                              ray_record)


def _is_packaged(checkpoint: Any) -> bool:
    with checkpoint.as_directory() as folder:
        return (Path(folder) / "model" / "manifest.json").is_file()


def _package_on_rank_zero(cfg: ExperimentConfig, bundle: Any, fit: Any, tmp: Path,
                          epochs_run: int, wall: float, ray_record: dict[str, Any]) -> None:
    """Rank 0 restores the best reported checkpoint, packages with the post-hoc fits and
    reports the run folder; the other ranks only join the report (a collective call)."""
    import ray.train

    monitor = cfg.train.monitor
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({PACKAGED: 1})
        return
    best = _best_reported(ray.train.get_all_reported_checkpoints(), monitor)
    with best.checkpoint.as_directory() as folder:
        record = restore_best(fit.module, Path(folder) / CKPT)
    record["best_score"] = float(best.metrics[monitor])
    folder = tmp / "run"
    folder.mkdir()
    save_splits(bundle, folder / "splits.json")
    package_fit(cfg, bundle, fit, folder / "model", epochs_run, record, wall,
                training={"ray": ray_record})
    if (tmp / "logs").is_dir():
        shutil.copytree(tmp / "logs", folder / "logs")
    ray.train.report({PACKAGED: 1, monitor: record["best_score"]},
                     checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def _best_reported(reported: list[Any], monitor: str) -> Any:
    """The checkpoint with the highest ``monitor`` (the first such, as Lightning picks)."""
    import math

    scored = [r for r in reported if not r.metrics.get(PACKAGED)
              and isinstance(r.metrics.get(monitor), int | float)
              and math.isfinite(r.metrics[monitor])]
    if not scored:
        raise ModelError(f"no checkpoint reported a finite {monitor}",
                         hint="check train.monitor and the validation split")
    return max(scored, key=lambda r: r.metrics[monitor])


def _train_members(ray: Any, cfg: ExperimentConfig, run: Path, members: int,
                   max_failures: int, resume: bool) -> ModelPackage:
    """An ensemble: every member a Ray task (a standard run of its own, seed + k), joined
    and post-hoc fitted once here; with ``resume`` members already packaged are kept."""
    bundle = load_bundle(cfg)
    net_options = ensemble_options(cfg, bundle)
    dump_config(cfg, run / "config.yaml")
    save_splits(bundle, run / "splits.json")
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=cfg.train.threads or 1, num_gpus=gpus,
                      max_retries=max_failures)(_train_member)
    start, pending = time.perf_counter(), {}
    for k in range(members):
        if resume and (run / "members" / str(k) / "model" / "manifest.json").is_file():
            logger.info("ensemble member %d/%d: kept from an earlier run", k + 1, members)
            continue
        pending[k] = task.remote({"config": cfg.model_dump(mode="json"), "env": _data_env()},
                                 k, net_options)
    logger.info("training %d ensemble members as Ray tasks", len(pending))
    for k, ref in pending.items():
        try:
            files = ray.get(ref)
        except Exception as e:  # a task error or a node lost more often than max_retries
            raise ModelError(f"ensemble member {k} failed on the Ray cluster: {e}",
                             hint="rerun with --resume to keep the members already trained"
                             ) from e
        _write_files(run / "members" / str(k), files)
    packages = [load_package(run / "members" / str(k) / "model") for k in range(members)]
    return join_members(cfg, run, bundle, packages, time.perf_counter() - start)


def _train_member(payload: dict[str, Any], k: int, net_options: dict) -> dict[str, bytes]:
    """One ensemble member as a Ray task: the local member run, returned as its files
    (``model/``, ``splits.json``, ``logs/``; not the checkpoints) so no shared disk is needed."""
    cfg = _on_node(payload)
    bundle = member_bundle(load_bundle(cfg), cfg.train.member_fraction, cfg.seed + k)
    with tempfile.TemporaryDirectory(prefix="meddx-member-") as tmp:
        train(member_config(cfg, k, net_options), out=tmp, progress=False, post_hoc=False,
              bundle=bundle)
        return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*"))
                if p.is_file() and "checkpoints" not in p.relative_to(tmp).parts}


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
