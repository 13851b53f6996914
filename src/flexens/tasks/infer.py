"""``infer.py``: flexible vs full on the test split, or predictions for images in the wild."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from flexens.artifacts import write_json
from flexens.calibration.certificate import certificate_line
from flexens.inference import (
    REPORTED,
    InferSettings,
    build_module,
    evaluate,
    load_calibrated_members,
    log_results,
    operating_point,
    per_sample_rows,
    predict_images,
    print_table,
    resolve_fuse_from,
    write_csv,
)
from flexens.latency import resolve_device
from flexens.reporting.loggers import open_logger, run_dir


def infer(cfg: DictConfig) -> dict:
    settings: InferSettings = instantiate(cfg.infer)
    device = resolve_device(cfg.device)
    members, calibration = load_calibrated_members(
        Path(settings.thresholds), Path(cfg.paths.members_dir)
    )
    point = operating_point(settings.operating_point, calibration)
    fuse_from = resolve_fuse_from(settings, calibration, point)
    module = build_module(members, calibration.criterion, point, settings, device, fuse_from)
    print(f"thresholds ({point.name}): " + ", ".join(f"{t:.2f}" for t in point.thresholds))
    if fuse_from is not None:
        print(f"fused continuation: samples reaching stage {fuse_from} run the rest in one call")
    print(certificate_line(point.certificate))
    datamodule = instantiate(cfg.data)
    run = run_dir(cfg)
    if cfg.input is not None:
        out = run / "predictions.csv"
        return predict_images(
            Path(cfg.input), settings.batch_size, module, datamodule, members, out
        )
    datamodule.setup()
    if datamodule.num_classes != members[0].num_classes:
        raise ValueError(
            f"members predict {members[0].num_classes} classes, data={datamodule.name} "
            f"has {datamodule.num_classes}; pick the matching data="
        )
    with open_logger(cfg, run, f"{cfg.ensemble.name}-infer-{settings.mode}") as logger:
        metrics, per_sample = evaluate(settings, module, datamodule, device, calibration, point)
        write_json(run / "metrics.json", metrics)
        columns, rows = per_sample_rows(per_sample, members[0].meta["class_names"])
        write_csv(run / "predictions.csv", columns, rows)
        print_table(
            {mode: metrics[mode] for mode in REPORTED if mode in metrics},
            metrics.get("baseline"),
        )
        print(f"metrics: {run / 'metrics.json'}")
        log_results(logger, metrics, columns, rows)
    return metrics
