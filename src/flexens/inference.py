"""Flexible vs full execution on the test split, or predictions for images in the wild.

Accuracy and exit stages come from ``Trainer.predict`` over the test split; latency and
throughput are measured separately on preloaded tensors (wall clock, after warm-up,
synchronised on GPU) so that data loading does not blur the comparison between modes.
Everything here takes typed objects; :mod:`flexens.tasks.infer` composes them.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch

from flexens.artifacts import write_text
from flexens.calibration.certificate import (
    certificate_metrics,
    certified_thresholds,
)
from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import select_point
from flexens.calibration.risk import pick_certified
from flexens.calibration.schema import Calibration, read_thresholds
from flexens.cuda_graphs import CudaGraphed
from flexens.ensemble import MODES, EnsembleOutput, FlexibleEnsembleModule
from flexens.fused import FusedMembers, can_fuse
from flexens.images import image_batches
from flexens.latency import (
    device_name,
    expected_latency_ms,
    expected_throughput,
    measure_configurations,
    reach_fractions,
    timing_sample,
)
from flexens.members.registry import Member, load_member
from flexens.predict import predict_in_place, predict_trainer
from flexens.reporting.loggers import log_table

GAP_WARNING = 0.15
"""Flag measured latency or throughput that differs from the latency model's by more."""


@dataclass(frozen=True)
class OperatingPointRequest:
    """``infer.operating_point``: at most one of ``lam``, ``max_drop`` (certified) or
    ``budget_ms``; none serves the calibrated thresholds."""

    lam: float | None = None
    max_drop: float | None = None
    budget_ms: float | None = None

    def __post_init__(self) -> None:
        chosen = [k for k in ("lam", "max_drop", "budget_ms") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"pick one infer.operating_point setting, got {chosen}")

    @property
    def chosen(self) -> tuple[str, float] | None:
        for key in ("lam", "max_drop", "budget_ms"):
            if getattr(self, key) is not None:
                return key, float(getattr(self, key))
        return None


@dataclass(frozen=True)
class InferSettings:
    """The ``infer`` config group (conf/infer/default.yaml), checked before any member loads."""

    thresholds: str
    mode: str = "flexible"
    first_k: int | None = None
    batch_size: int = 256
    latency_images: int = 200
    throughput_images: int = 4096
    warmup: int = 10
    channels_last: bool = False
    fuse_from: int | str | None = "auto"
    cuda_graphs: bool = True
    operating_point: OperatingPointRequest = field(default_factory=OperatingPointRequest)

    def __post_init__(self) -> None:
        for key in ("batch_size", "latency_images", "throughput_images"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"infer.{key} must be a whole number >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"infer.warmup must be a whole number >= 0, got {self.warmup!r}")
        if self.mode not in MODES:
            raise ValueError(
                f"unknown mode {self.mode!r}; use one of {', '.join(MODES)} (infer.mode=...)"
            )
        for key in ("channels_last", "cuda_graphs"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"infer.{key} must be true or false, got {getattr(self, key)!r}")
        fuse = self.fuse_from
        if fuse not in (None, "auto") and (
            isinstance(fuse, bool) or not isinstance(fuse, int) or fuse < 1
        ):
            raise ValueError(f"infer.fuse_from must be auto, null or a stage >= 1, got {fuse!r}")


@dataclass(frozen=True)
class OperatingPoint:
    """The thresholds served, their name, expected ms/image and certificate (or estimate)."""

    thresholds: list[float]
    name: str
    expected_latency_ms: float
    certificate: dict


def load_calibrated_members(
    path: Path, members_dir: Path, setting: str = "infer.thresholds"
) -> tuple[list[Member], Calibration]:
    """The members named in thresholds.json, checked by count and weights hash.

    thresholds.json names each member by its file name inside ``members_dir``; a name
    that leads elsewhere is refused, and each file's hash is checked against the one
    recorded at calibration before its weights are deserialised.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"thresholds file {str(path)!r} does not exist; run calibrate.py first "
            f"(or pass {setting}=/path/to/thresholds.json)"
        )
    calibration = read_thresholds(path)  # every field checked before one is used
    members = []
    for recorded in calibration.members:
        name, sha256 = recorded.path, recorded.sha256
        if name in ("", ".", "..") or "/" in name or "\\" in name or ".." in name:
            raise ValueError(
                f"{path} names member {name!r}, not a file name inside the members folder "
                f"{members_dir} (written before members were named by file, or edited); "
                "recalibrate: python calibrate.py"
            )
        twin = next((m for m in members if m.sha256 == sha256), None)
        if twin is not None:
            raise ValueError(
                f"{path} lists {name} and {twin.path.name}, which hold the same weights; "
                "recalibrate: python calibrate.py"
            )
        members.append(load_member(members_dir / name, sha256, calibrated_in=path))
    return members, calibration


OPERATING_POINT_OBJECTIVES = {"lam": "lambda", "budget_ms": "budget"}
"""``infer.operating_point.<setting>`` → the objective that picks from the (uncertified)
Pareto front; ``max_drop`` picks from the certified front instead."""


def operating_point(request: OperatingPointRequest, calibration: Calibration) -> OperatingPoint:
    """The calibrated thresholds, or another point of the calibration's fronts."""
    if request.chosen is None:
        return OperatingPoint(
            list(calibration.thresholds),
            "calibrated",
            calibration.flexible.expected_latency_ms,
            calibration.certificate,
        )
    setting, value = request.chosen
    if setting == "max_drop":
        return certified_operating_point(calibration, value)
    objective = Objective(
        kind=OPERATING_POINT_OBJECTIVES[setting],
        latency_full_ms=calibration.full.expected_latency_ms,
        error_full=1.0 - calibration.full.accuracy,
        num_samples=calibration.num_samples,
        **{setting: float(value)},
    )
    point, feasible = select_point(list(calibration.pareto_front), objective)
    if not feasible:
        print(
            f"warning: no calibrated operating point meets {objective.describe()}; using the "
            f"closest ({point.accuracy:.2%} at {point.latency_ms:.3f} ms expected)"
        )
    estimate = uncertified_point(calibration, point.accuracy)
    return OperatingPoint(point.thresholds, f"{setting}={value:g}", point.latency_ms, estimate)


def certified_operating_point(calibration: Calibration, epsilon: float) -> OperatingPoint:
    """The cheapest point certified at ``epsilon`` by the calibration's fixed-sequence test."""
    basis, front = calibration.certification, list(calibration.certified_front)
    if not basis or not front:
        raise ValueError(
            f"{calibration.ensemble}'s thresholds.json holds no certified "
            "front (calibrated before certificates existed); recalibrate: python calibrate.py"
        )
    if not 0 < epsilon < 1:
        raise ValueError(f"infer.operating_point.max_drop must be in (0, 1), got {epsilon}")
    thresholds, certificate = certified_thresholds(front, epsilon, basis)
    latency = pick_certified(front, epsilon)["expected_latency_ms"]
    return OperatingPoint(thresholds, f"max_drop={epsilon:g}", latency, certificate)


def uncertified_point(calibration: Calibration, accuracy: float) -> dict:
    """A λ/budget point from the Pareto front: its calibration-split loss, as an estimate."""
    return {
        "certified": False,
        "risk": calibration.certificate.get("risk", "drop"),
        "observed_risk": max(calibration.full.accuracy - accuracy, 0.0),
        "num_samples": calibration.num_samples,
    }


def measure_latency(
    module: FlexibleEnsembleModule,
    modes: list[str],
    singles: torch.Tensor,
    stream: torch.Tensor,
    batch_size: int,
    device: torch.device,
    warmup: int = 10,
    rounds: int = 5,
    profile: dict | None = None,
) -> dict[str, dict]:
    """Mean (and p50/p90/p99) ms per image at batch 1 and images/s at the serving batch of
    each mode, plus the fused full ensemble when the members share one architecture and,
    for ``flexible``, its staged stream (throughput only, :mod:`flexens.staged`): all
    interleaved (:func:`flexens.latency.measure_configurations`): the full ensembles at
    their best thread count, the others at the one the latency profile chose."""
    members = list(module.members)
    fns = {}
    for mode in modes:
        twin = FlexibleEnsembleModule(
            members,
            module.thresholds,
            module.criterion_name,
            mode=mode,
            first_k=module.first_k,
            channels_last=module.channels_last,
            fuse_from=module.fuse_from,
            cuda_graphs=module.cuda_graphs,
        )
        fns[mode] = twin
    if can_fuse(members):
        fns[FUSED_FULL] = FusedMembers(members).to(device).full
    if "flexible" in modes:
        fns[STAGED] = fns["flexible"].staged(batch_size)
    if device.type == "cuda":  # the fastest full ensemble on a GPU is a graphed one
        for mode in modes:
            fns[mode].prepare_graphs(singles[:1].to(device), batch_size)
        fused = fns.get(FUSED_FULL)
        fns |= graphed_fulls(members, fused, singles[:1].to(device), len(stream), batch_size)
    threads = (profile or {}).get("threads")
    # at the serving batch: the baselines at every thread count, the rest as profiled
    explore = ["full", FUSED_FULL]
    return measure_configurations(
        fns,
        singles,
        stream,
        batch_size,
        device,
        rounds,
        warmup,
        threads,
        explore,
        every_thread_count_at_batch1=True,
    )


FUSED_FULL = "full_fused"
"""The full ensemble as one ``vmap`` call (:class:`flexens.fused.FusedMembers`)."""
STAGED = "flexible_staged"
"""Flexible mode over the stream with every member at the serving batch
(:mod:`flexens.staged`): the same answers, timed for throughput only."""
GRAPHED = "_graph"
"""Suffix of a full ensemble replayed from CUDA graphs (``full_graph``, ``full_fused_graph``)."""
FULL_BASELINES = ("full", FUSED_FULL, "full" + GRAPHED, FUSED_FULL + GRAPHED)
REPORTED = (*MODES, *FULL_BASELINES, STAGED)
"""The rows of ``infer.py``'s table and W&B metrics (metrics.json holds them all)."""


def graphed_fulls(
    members: list, fused, example: torch.Tensor, images: int, batch_size: int
) -> dict:
    """The full ensemble (eager members: a graph cannot hold graphs) and the fused call as
    CUDA graphs, captured here for every batch size the timing feeds them (batch 1, the
    serving batch and the stream's last partial batch)."""
    sizes = sorted({1, min(batch_size, images), images % batch_size or batch_size})
    eager = {"full": FlexibleEnsembleModule(members, mode="full"), FUSED_FULL: fused}
    graphed = {}
    with torch.inference_mode():
        for name, fn in eager.items():
            if fn is not None:
                graphed[name + GRAPHED] = CudaGraphed(fn)
                graphed[name + GRAPHED].prepare(example, sizes)
    return graphed


def fastest_full(results: dict, names: Sequence[str] = FULL_BASELINES) -> dict:
    """Which full ensemble is the baseline: the fastest at batch 1 and at the serving batch
    (sequential ``full`` or ``full_fused``, each already at its best thread count, and on a
    GPU either as one CUDA graph)."""
    fulls = [m for m in names if results.get(m, {}).get("latency_mean_ms")]
    latency = min(fulls, key=lambda m: results[m]["latency_mean_ms"])
    throughput = max(fulls, key=lambda m: results[m]["throughput_img_s"])
    return {
        "latency": latency,
        "latency_mean_ms": results[latency]["latency_mean_ms"],
        "throughput": throughput,
        "throughput_img_s": results[throughput]["throughput_img_s"],
    }


def predict_split(trainer: L.Trainer, module: FlexibleEnsembleModule, loader) -> EnsembleOutput:
    """Every sample's answer in the module's current mode, through ``Trainer.predict``."""
    return EnsembleOutput.cat(predict_in_place(trainer, module, loader)).cpu()


def accuracy_summary(out: EnsembleOutput, num_members: int) -> dict:
    """Accuracy, members used and exit stages of one mode over a labelled split."""
    return {
        "accuracy": float((out.prediction == out.target).float().mean()),
        "avg_members": float((out.exit_stage + 1).float().mean()),
        "exit_histogram": torch.bincount(out.exit_stage, minlength=num_members).tolist(),
    }


def resolve_fuse_from(
    settings: InferSettings, calibration: Calibration, point: OperatingPoint
) -> int | None:
    """``infer.fuse_from``: ``auto`` follows the calibration's choice for its own
    thresholds (another operating point runs one by one: nobody priced fusing for it)."""
    if settings.fuse_from != "auto":
        return settings.fuse_from
    if settings.mode != "flexible" or list(point.thresholds) != list(calibration.thresholds):
        return None
    return calibration.fuse_from


def build_module(
    members: list[Member],
    criterion: str,
    point: OperatingPoint,
    settings: InferSettings,
    device: torch.device,
    fuse_from: int | None = None,
) -> FlexibleEnsembleModule:
    module = FlexibleEnsembleModule(
        [m.network for m in members],
        point.thresholds,
        criterion,
        mode=settings.mode,
        first_k=settings.first_k,
        channels_last=settings.channels_last,
        fuse_from=fuse_from,
        cuda_graphs=settings.cuda_graphs,
    )
    return module.to(device).eval()


def evaluate(
    settings: InferSettings,
    module: FlexibleEnsembleModule,
    datamodule,
    device: torch.device,
    calibration: Calibration,
    point: OperatingPoint,
) -> tuple[dict, EnsembleOutput]:
    """metrics.json's content, and the configured mode's answer for every test sample."""
    expected = {
        "full": calibration.full.expected_latency_ms,
        "flexible": point.expected_latency_ms,
    }
    profile = calibration.latency_profile
    if profile and profile.get("fused_batch1_ms"):  # every member fused: stage 0 runs them all
        everyone = np.ones(len(profile["members"]))
        expected[FUSED_FULL] = expected_latency_ms(profile, everyone, fuse_from=0)
    results, per_sample, sizes = compare_modes(
        settings, module, datamodule, device, expected, calibration.latency_profile
    )
    metrics = {
        **results,
        "ensemble": calibration.ensemble,
        "members": module.num_members,
        "criterion": calibration.criterion,
        "thresholds": list(point.thresholds),
        "operating_point": point.name,
        "certificate": point.certificate,
        "device": device_name(device),
        **sizes,
    }
    return metrics, per_sample


def log_results(logger, metrics: dict, columns: list[str], rows: list[list]) -> None:
    if logger is None:
        return
    logger.log_metrics(
        {
            f"test/{mode}/{k}": v
            for mode, r in metrics.items()
            if mode in REPORTED and isinstance(r, dict)
            for k, v in r.items()
            if isinstance(v, float)
        }
        | certificate_metrics(metrics["certificate"])
    )
    log_table(logger, "per_sample_exits", columns, rows)


def compare_modes(
    settings: InferSettings,
    module: FlexibleEnsembleModule,
    datamodule,
    device,
    expected: dict,
    profile: dict | None = None,
) -> tuple[dict, EnsembleOutput, dict]:
    """Accuracy of the configured mode, ``full`` and the oracle and the configured mode's
    answer for every test sample; measured latency of the first two, of the fused full
    ensemble and (throughput only) of the staged stream against the fastest full one, on a
    seeded random sample of the test split (:func:`flexens.latency.timing_sample`)."""
    trainer = predict_trainer(device, progress_bar=False)
    test = datamodule.test_set
    n_single = min(int(settings.latency_images), len(test))
    n_stream = int(settings.throughput_images)  # a small split is streamed more than once
    sample = timing_sample(len(test), max(n_single, n_stream))
    singles = torch.stack([test[i][0] for i in sample[:n_single]])
    stream = torch.stack([test[i][0] for i in itertools.islice(itertools.cycle(sample), n_stream)])
    modes = list(dict.fromkeys([settings.mode, "full"]))
    results, answers = {}, {}
    for mode in [*modes, "oracle"]:  # the oracle needs every member: no latency to claim
        module.set_mode(mode, settings.first_k)
        answers[mode] = predict_split(trainer, module, datamodule.test_dataloader())
        results[mode] = accuracy_summary(answers[mode], module.num_members)
    module.set_mode(settings.mode, settings.first_k)
    batch_size, warmup = int(settings.batch_size), int(settings.warmup)
    timings = measure_latency(
        module, modes, singles, stream, batch_size, device, warmup, profile=profile
    )
    for name in timings.keys() - results.keys():  # fused, graphed or staged: same answers
        if name == STAGED:
            results[name] = dict(results["flexible"])
        else:
            results[name] = {k: results["full"][k] for k in ("accuracy", "avg_members")}
    for name, timing in timings.items():
        results[name].update(timing)
    baseline = fastest_full(results)
    for name in timings:
        add_expectations(
            name, results[name], expected, profile, baseline, module.fuse_from, n_stream
        )
    for line in gap_warnings(results, list(timings)):
        print(line)
    sizes = {
        "test_samples": len(test),
        "latency_images": n_single,
        "throughput_images": n_stream,
        "batch_size": int(settings.batch_size),
        "baseline": baseline,
    }
    return results, answers[settings.mode], sizes


def add_expectations(
    mode: str,
    result: dict,
    expected: dict,
    profile: dict | None,
    baseline: dict,
    fuse_from: int | None = None,
    images: int | None = None,
) -> None:
    """Speed-ups against the fastest full ensemble, and the latency model's predictions
    next to what was measured (:func:`gap_warnings` reads the gaps). ``images``: how many
    the throughput timing streamed (a staged stream's last partial batches are priced)."""
    if "latency_mean_ms" in result:  # a staged stream is timed for throughput only
        result["speedup_latency"] = baseline["latency_mean_ms"] / result["latency_mean_ms"]
    result["speedup_throughput"] = result["throughput_img_s"] / baseline["throughput_img_s"]
    if mode in expected:
        result["expected_latency_ms"] = expected[mode]
        result["latency_gap"] = result["latency_mean_ms"] / expected[mode] - 1.0
    if profile is not None and "exit_histogram" in result and mode != FUSED_FULL:
        exits = np.repeat(np.arange(len(result["exit_histogram"])), result["exit_histogram"])
        reach = reach_fractions(exits, len(result["exit_histogram"]))
        result["expected_throughput_img_s"] = expected_throughput(
            profile, reach, staged_images=images if mode == STAGED else None
        )
        if mode == "flexible" and fuse_from is not None:  # the calibration priced one by one
            result["expected_latency_ms"] = expected_latency_ms(profile, reach, fuse_from)
            result["latency_gap"] = result["latency_mean_ms"] / result["expected_latency_ms"] - 1
        result["throughput_gap"] = (
            result["throughput_img_s"] / result["expected_throughput_img_s"] - 1.0
        )


GAPS = (("latency_gap", "mean batch-1 latency"), ("throughput_gap", "throughput"))
"""The measured-over-predicted gaps :func:`gap_warnings` reads, and what each measures."""


def gap_warnings(results: dict, modes: Sequence[str]) -> list[str]:
    """One line per mode and quantity more than :data:`GAP_WARNING` off the latency model.

    ``full`` is timed in the same rounds, so a change of the machine's speed since
    profiling moves it as much as any mode. A mode whose gap is about full's (their ratio
    within the tolerance) says the machine or the profile changed; one that is off against
    full too is mispriced by the model, and re-profiling would not help.
    """
    lines = []
    for mode in modes:
        for key, what in GAPS:
            gap, reference = results[mode].get(key), results.get("full", {}).get(key)
            if gap is None or abs(gap) <= GAP_WARNING:
                continue
            relative = None if reference is None else (1 + gap) / (1 + reference) - 1
            if mode != "full" and relative is not None and abs(relative) > GAP_WARNING:
                cause = (
                    f"{relative:+.0%} against full, timed in the same rounds: the latency "
                    f"model misprices {mode} here"
                )
            else:
                cause = "a busy machine, or a stale profile: calibrate.reprofile=true"
            lines.append(
                f"warning: {mode}'s measured {what} is {gap:+.0%} off the latency profile's "
                f"prediction ({cause})"
            )
    return lines


def per_sample_rows(
    per_sample: EnsembleOutput, class_names: list[str]
) -> tuple[list[str], list[list]]:
    columns = ["index", "target", "prediction", "confidence", "members_used"]
    rows = [
        [i, class_names[int(t)], class_names[int(p)], float(c), int(e) + 1]
        for i, (t, p, c, e) in enumerate(
            zip(
                per_sample.target,
                per_sample.prediction,
                per_sample.probs.amax(dim=1),
                per_sample.exit_stage,
                strict=True,
            )
        )
    ]
    return columns, rows


def predict_images(
    source: Path,
    batch_size: int,
    module: FlexibleEnsembleModule,
    datamodule,
    members: list[Member],
    out: Path,
) -> dict:
    """``out`` (predictions.csv) for unlabelled images; unreadable files are reported and
    skipped.

    The files are decoded a batch at a time (:func:`flexens.images.image_batches`), so a
    folder of any size costs a few batches of memory. In flexible mode (members one by one)
    the batches go through the module's staged stream (:mod:`flexens.staged`): the same
    answers as batch by batch, with every member called on full batches, which is the faster
    way through a folder (BENCHMARKS.md: the staged stream). Other modes, and fused
    continuation, run batch by batch.
    """
    in_chans = members[0].arch.get("in_chans", 3)
    batches = image_batches(source, in_chans, datamodule.image_transform(), batch_size)
    device = next(module.parameters()).device
    staged = module.mode == "flexible" and module.fuse_from is None
    stream = module.staged(batch_size) if staged else None
    paths: list[Path] = []
    outputs: list[EnsembleOutput] = []
    skipped = 0
    with torch.inference_mode():
        for loaded in batches:
            x = loaded.tensors.to(device)
            if stream is not None:
                stream.push(x)
            else:
                outputs.append(module(x).cpu())
            paths += loaded.paths
            skipped += len(loaded.failures)
        cat = stream.finish().cpu() if stream is not None else EnsembleOutput.cat(outputs)
    class_names = members[0].meta["class_names"]
    columns = ["file", "class_name", "confidence", "members_used"]
    rows = [
        [str(path), class_names[int(p)], round(float(c), 6), int(e) + 1]
        for path, p, c, e in zip(
            paths,
            cat.prediction,
            cat.probs.amax(dim=1),
            cat.exit_stage,
            strict=True,
        )
    ]
    write_csv(out, columns, rows)
    print(f"{len(rows)} image(s) predicted, {skipped} skipped: {out}")
    return {"predictions": str(out), "predicted": len(rows), "skipped": skipped}


def write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def cell(value: float | None, spec: str = ".3f", suffix: str = "", missing: str = "-") -> str:
    """A table cell: ``value`` formatted, or ``missing`` where a mode has none (a staged
    stream has no batch-1 figures, the oracle no timing at all)."""
    return missing if value is None else f"{value:{spec}}{suffix}"


def print_table(results: dict, baseline: dict | None = None) -> None:
    """Mean batch-1 latency is the headline (the paper's metric); speed-ups are against the
    fastest full ensemble, named below the table."""
    print(
        f"{'mode':<16} {'accuracy':>9} {'members':>8} {'mean ms':>8} {'p50':>7} {'p90':>7} "
        f"{'p99':>7} {'img/s':>8} {'thr':>4} {'expect ms':>9} {'speed-up':>11}"
    )
    for mode, r in results.items():
        threads = f"{cell(r.get('threads_batch1'), 'd')}/{cell(r.get('threads_batched'), 'd')}"
        speedup = (
            f"{cell(r.get('speedup_latency'), '.2f', '×')}/"
            f"{cell(r.get('speedup_throughput'), '.2f', '×')}"
        )
        print(
            f"{mode:<16} {r['accuracy']:>9.4f} {r['avg_members']:>8.3f} "
            f"{cell(r.get('latency_mean_ms')):>8} {cell(r.get('latency_p50_ms')):>7} "
            f"{cell(r.get('latency_p90_ms')):>7} {cell(r.get('latency_p99_ms')):>7} "
            f"{cell(r.get('throughput_img_s'), '.1f'):>8} {threads:>4} "
            f"{cell(r.get('expected_latency_ms')):>9} {speedup:>11}"
        )
    if baseline:
        print(
            f"full = fastest full ensemble: {baseline['latency']} at batch 1, "
            f"{baseline['throughput']} at the serving batch (at its best thread count; "
            "thr = threads at batch 1 / serving batch; speed-up = batch 1 / serving batch)"
        )
