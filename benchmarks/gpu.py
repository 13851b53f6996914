"""The GPU path on a GPU: the CIFAR-10 members of benchmarks/cifar10.py timed with CUDA
synchronisation, against the strongest full ensembles a GPU offers (fused, CUDA graphs).

    python benchmarks/gpu.py --export-images outputs/gpu/cifar10-test.pt   # here: the inputs
    python benchmarks/gpu.py --images outputs/gpu/cifar10-test.pt --device cuda
    python benchmarks/gpu.py --render benchmarks/results/gpu.json --update-docs

A GPU machine usually sees neither the image tree nor the calibration split, so the first
command writes ``--count`` test images (a seeded random sample of the split), exactly as the
model sees them (float32 after the evaluation transform), with their labels, to one file; the second needs only that
file, the member files and the thresholds.json files (``benchmarks/cifar10.py`` writes them
under ``benchmarks/results/runs``). Every configuration also runs on the CPU of the same
machine over the same images: how many answers (prediction and exit stage) agree says what
the GPU's arithmetic (TF32 convolutions by default) changes.

CUDA graphs: a full ensemble is one graph per input shape. Flexible execution cannot be one
graph (which samples go on is decided on the host after each stage), so each member is
graphed on its own, at sub-batch sizes padded up to a power of two (rows are independent in
an inference-form member, so padding rows change nothing for the real ones).

Staged stream (``flexens.staged``): each operating point also runs over the stream with
every member call at the serving batch (the members as CUDA graphs on a GPU), timed for
throughput only. Batch by batch, members 2..N see sub-batches of tens of samples, which
leave a GPU's cores idle; staging is the way a GPU keeps them busy offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLEXENS_ROOT", str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import fmt, gap  # noqa: E402

from flexens.allocator import retain_freed_memory  # noqa: E402
from flexens.artifacts import replace_marked_section, torch_save, write_json, write_text  # noqa: E402
from flexens.calibration.schema import read_thresholds  # noqa: E402
from flexens.cuda_graphs import map_tensors  # noqa: E402
from flexens.ensemble import EnsembleOutput, FlexibleEnsembleModule  # noqa: E402
from flexens.fused import FusedMembers, can_fuse  # noqa: E402
from flexens.halting import get_criterion  # noqa: E402
from flexens.inference import (  # noqa: E402
    GRAPHED,
    fastest_full,
    graphed_fulls,
    load_calibrated_members,
)
from flexens.latency import (  # noqa: E402
    Stream,
    expected_latency_ms,
    expected_throughput,
    latency_profile,
    machine_info,
    measure_configurations,
    reach_fractions,
    resolve_device,
    timing_sample,
)

RUNS = ROOT / "benchmarks" / "results" / "runs"
DEFAULT_THRESHOLDS = (
    f"margin λ=10 (default):{RUNS / 'margin' / 'default' / 'thresholds.json'}",
    f"margin certified ≤ 1 pp:{RUNS / 'certified_1pp' / 'thresholds.json'}",
)
FULL, FUSED = "full ensemble", "full ensemble (fused)"
GRAPH, MEMBER_GRAPHS = ", CUDA graph", ", CUDA-graph members"
STAGED = ", staged stream"


# -- inputs ----------------------------------------------------------------------------------
def export_images(path: Path, count: int, overrides: list[str]) -> None:
    """``count`` test images as the members see them (a seeded random sample: the split is
    sorted by class), and their labels."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    test = datamodule.test_set
    count = min(count, len(test))
    samples = [test[i] for i in timing_sample(len(test), count)]
    torch_save(
        path,
        {
            "images": torch.stack([s[0] for s in samples]).float(),
            "labels": torch.tensor([int(s[1]) for s in samples]),
            "source": f"{count} of {len(test)} test images (seeded random sample), "
            f"{' '.join(overrides)}",
        },
    )
    print(f"wrote {count} images to {path}")


def read_images(path: Path) -> tuple[Tensor, Tensor, str]:
    """The file ``--export-images`` wrote (tensors only: loading it runs no code; anything
    else, a crafted pickle included, is refused with one line)."""
    fix = "write one with --export-images FILE"
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a bad file
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: --images {path} does not exist; {fix}") from None
    except pickle.UnpicklingError:
        raise SystemExit(
            f"error: --images {path} holds more than tensors (loading it would run code or "
            f"build objects), so it is not read; {fix}"
        ) from None
    except Exception as error:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise SystemExit(
            f"error: --images {path} is not a readable --export-images file "
            f"({type(error).__name__}); {fix}"
        ) from None
    if not isinstance(data, dict) or not {"images", "labels"} <= set(data):
        raise SystemExit(f"error: --images {path} is not an --export-images file; {fix}")
    return data["images"], data["labels"], str(data.get("source", ""))


# -- configurations --------------------------------------------------------------------------
def configurations(networks, calibrations, example: Tensor, batch_size: int) -> dict:
    """name → (callable, the members it runs in profile order, or None where the latency
    model does not price it). The model prices members as inference runs them (CUDA graphs
    on a GPU), so on a GPU the eager rows are comparisons without a prediction. Every graph
    is captured here, so none is captured while timed. A staged stream (a
    :class:`~flexens.latency.Stream`) runs its operating point's graphed members on a GPU."""
    n, gpu = len(networks), example.is_cuda

    def ensemble(nets, graphs: bool, **kwargs) -> FlexibleEnsembleModule:
        module = FlexibleEnsembleModule(nets, cuda_graphs=graphs, **kwargs)
        module.prepare_graphs(example, batch_size)
        return module

    everyone = list(range(n))
    configs = {"member 1 alone": (ensemble(networks[:1], gpu, mode="full"), [0])}
    configs[FULL] = (ensemble(networks, False, mode="full"), None if gpu else everyone)
    if gpu:
        configs[FULL + MEMBER_GRAPHS] = (ensemble(networks, True, mode="full"), everyone)
    fused = FusedMembers(networks).to(example.device) if can_fuse(networks) else None
    if fused is not None:
        configs[FUSED] = (fused.full, None)
    if gpu:  # the whole ensemble as one graph: infer.py's graphed baselines
        graphs = graphed_fulls(networks, fused and fused.full, example, batch_size, batch_size)
        for name, graphed in graphs.items():
            configs[FULL + GRAPH if name == "full" + GRAPHED else FUSED + GRAPH] = (graphed, None)
    for label, calibration in calibrations.items():
        point = {"thresholds": calibration.thresholds, "criterion": calibration.criterion}
        configs[f"flexible {label}"] = (
            ensemble(networks, False, **point),
            None if gpu else everyone,
        )
        if gpu:
            configs[f"flexible {label}{MEMBER_GRAPHS}"] = (
                ensemble(networks, True, **point),
                everyone,
            )
        module = configs[f"flexible {label}{MEMBER_GRAPHS if gpu else ''}"][0]
        configs[f"flexible {label}{STAGED}"] = (module.staged(batch_size), everyone)
    return configs


def outputs_of(
    fn, images: Tensor, batch_size: int, device: torch.device, members: int
) -> EnsembleOutput:
    """Prediction and exit stage of every image (the fused call's: the last stage; a staged
    stream's: over the images as one stream, in an empty copy of it)."""
    if isinstance(fn, Stream):
        with torch.inference_mode():
            out = fn.fresh().run(b.to(device) for b in images.split(batch_size))
        return map_tensors(lambda t: t.cpu().clone(), out)
    parts = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            out = fn(batch.to(device))
            if isinstance(out, Tensor):  # the fused call's averaged probabilities
                last = torch.full((out.shape[0],), members - 1, dtype=torch.long, device=out.device)
                out = EnsembleOutput(probs=out, exit_stage=last, confidence=out.amax(1))
            parts.append(map_tensors(lambda t: t.cpu().clone(), out))
    return EnsembleOutput.cat(parts)


# -- the run ---------------------------------------------------------------------------------
def run(args) -> dict:
    device = resolve_device(args.device)
    images, labels, source = read_images(Path(args.images))
    bad = [pair for pair in args.thresholds if ":" not in pair]
    if bad:
        raise ValueError(f"--thresholds takes LABEL:PATH pairs, got {bad[0]!r}")
    labelled = dict(pair.split(":", 1) for pair in args.thresholds)
    calibrations = {label: read_thresholds(Path(p)) for label, p in labelled.items()}
    first = Path(next(iter(labelled.values())))
    members, _ = load_calibrated_members(first, Path(args.members_dir))
    hashes = [m.sha256 for m in members]
    for label, calibration in calibrations.items():
        if [m.sha256 for m in calibration.members] != hashes:
            raise ValueError(f"{labelled[label]} was calibrated for other members than {first}")
    cpu_nets = [m.network.eval() for m in members]
    networks = [copy.deepcopy(net).to(device).eval() for net in cpu_nets]
    start = time.perf_counter()
    configs = configurations(networks, calibrations, images[:1].to(device), args.batch_size)
    capture_s = time.perf_counter() - start

    timed_images = args.rounds * args.round_batches * args.batch_size
    singles = images[: args.latency_images]
    stream = images.repeat(-(-timed_images // len(images)), 1, 1, 1)[:timed_images]
    reference = configurations(cpu_nets, calibrations, images[:1], args.batch_size)
    cpu = {
        n: outputs_of(fn, images, args.batch_size, torch.device("cpu"), len(cpu_nets))
        for n, (fn, _) in reference.items()
    }
    outputs, stream_exits = {}, {}
    for name, (fn, _) in configs.items():
        n = len(networks)
        outputs[name] = outputs_of(fn, images, args.batch_size, device, n)
        stream_exits[name] = outputs_of(fn, stream, args.batch_size, device, n).exit_stage.numpy()

    criterion = next(iter(calibrations.values())).criterion
    profile = latency_profile(
        networks, hashes, images[:1].to(device), args.batch_size, device,
        get_criterion(criterion), int(labels.max()) + 1, seconds=args.profile_seconds,
    )  # fmt: skip
    timings = measure_configurations(
        {n: fn for n, (fn, _) in configs.items()},
        singles,
        stream,
        args.batch_size,
        device,
        rounds=args.rounds,
    )
    fulls = [n for n in configs if n.startswith(FULL)]
    baseline = fastest_full(timings, fulls)
    rows = []
    for name, (_, order) in configs.items():
        out, t = outputs[name], timings[name]
        num = len(order or networks)
        exits, stream_ex = out.exit_stage.numpy(), stream_exits[name]
        eager = name.split(", CUDA")[0]  # its CPU twin
        row = {
            "name": name,
            "top1": float((out.prediction == labels).float().mean()),
            "avg_members": float((exits + 1).mean()),
            **t,
            "speedup_latency": (
                baseline["latency_mean_ms"] / t["latency_mean_ms"]
                if "latency_mean_ms" in t  # a staged stream is timed for throughput only
                else None
            ),
            "speedup_throughput": t["throughput_img_s"] / baseline["throughput_img_s"],
            "same_prediction_as_cpu": int((out.prediction == cpu[eager].prediction).sum()),
            "same_exit_as_cpu": int((out.exit_stage == cpu[eager].exit_stage).sum()),
        }
        if order is not None:  # the model prices members one by one
            sub = {**profile, "members": [profile["members"][i] for i in order]}
            staged = name.endswith(STAGED)
            if not staged:
                row["expected_ms"] = expected_latency_ms(
                    sub, reach_fractions(exits[: len(singles)], num)
                )
            row["expected_img_s"] = expected_throughput(
                sub, reach_fractions(stream_ex, num), staged_images=len(stream) if staged else None
            )
        rows.append(row)
    return {
        "machine": {**machine_info(device), "device_type": device.type},
        "images": {"count": len(images), "source": source},
        "latency_images": len(singles),
        "throughput_images": len(stream),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "baseline": baseline,
        "graph_capture_s": capture_s,
        "tf32_convolutions": bool(torch.backends.cudnn.allow_tf32),
        "latency_profile": {
            k: profile[k] for k in ("members", "overhead_ms", "staged_overhead_ms", "profiling_s")
        },
        "rows": rows,
    }


# -- the report ------------------------------------------------------------------------------
def markdown(result: dict, command: str) -> str:
    m, base, b = result["machine"], result["baseline"], result["batch_size"]
    n = result["images"]["count"]
    lines = [
        f"Machine: {m['device']} ({m['cpu_count']} CPU cores), torch {m['torch']}, Python "
        f"{m['python']}; {m['date']}. Command: `{command}`."
        + (
            f" TF32 convolutions: {'on (PyTorch default)' if result['tf32_convolutions'] else 'off'}."
            if "cuda" in m["device_type"]
            else ""
        ),
        "",
        f"Images: {result['images']['source']}; top-1 and members over those {n}. Mean ms per "
        f"image at batch 1 over {result['latency_images']} of them (p50/p99 beside it), "
        f"images/s at batch {b} over {result['throughput_images']} (the images repeated), "
        f"{result['rounds']} interleaved rounds"
        f"{', CUDA synchronised around every call' if 'cuda' in m['device_type'] else ''}. "
        f"Speed-ups against the fastest full ensemble: **{base['latency']}** at batch 1, "
        f"**{base['throughput']}** at batch {b}. `same as CPU`: answers (prediction / exit "
        f"stage) equal to the same configuration on this machine's CPU, out of {n}. "
        "Predicted: the latency model fed a profile measured on this device in the same run "
        "(on a GPU the profile times members as CUDA graphs, as `infer.py` runs them, so the "
        "eager rows have no prediction). "
        f"Graph capture before timing: {result['graph_capture_s']:.1f} s.",
        "",
        "| configuration | top-1 % | avg members | mean ms (b=1) | p50 | p99 | predicted ms "
        f"| speed-up (b=1) | img/s (b={b}) | predicted img/s | gain (b={b}) | same as CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['top1'] * 100:.2f} | {r['avg_members']:.3f} "
            f"| {fmt(r.get('latency_mean_ms'))} | {fmt(r.get('latency_p50_ms'))} "
            f"| {fmt(r.get('latency_p99_ms'))} | {fmt(r.get('expected_ms'))}"
            f"{'' if r.get('expected_ms') is None else ' (' + fmt(gap(r['latency_mean_ms'], r['expected_ms']), '+.0%') + ')'} "
            f"| {fmt(r['speedup_latency'], '.2f', '×')} | {r['throughput_img_s']:.0f} "
            f"| {fmt(r.get('expected_img_s'), '.0f')}"
            f"{'' if r.get('expected_img_s') is None else ' (' + fmt(gap(r['throughput_img_s'], r['expected_img_s']), '+.0%') + ')'} "
            f"| {r['speedup_throughput']:.2f}× "
            f"| {r['same_prediction_as_cpu']} / {r['same_exit_as_cpu']} |"
        )
    return "\n".join(lines) + "\n"


def batch_sweep(results: list[dict]) -> str:
    """How the serving-batch gains move with the serving batch: one column per run."""
    results = sorted(results, key=lambda r: r["batch_size"])
    sizes = [r["batch_size"] for r in results]
    head = " | ".join(f"gain (b={b})" for b in sizes)
    lines = [
        "Fastest full ensemble at each serving batch: "
        + "; ".join(
            f"b={r['batch_size']}: {r['baseline']['throughput']}, "
            f"{r['baseline']['throughput_img_s']:,.0f} img/s"
            for r in results
        )
        + ".",
        "",
        f"| configuration | {head} |",
        "|---|" + "---:|" * len(sizes),
    ]
    for row in results[0]["rows"]:
        gains = []
        for r in results:
            same = next(x for x in r["rows"] if x["name"] == row["name"])
            predicted = same.get("expected_img_s")
            note = (
                "" if predicted is None else f" ({gap(same['throughput_img_s'], predicted):+.0%})"
            )
            gains.append(f"{same['speedup_throughput']:.2f}×{note}")
        lines.append(f"| {row['name']} | " + " | ".join(gains) + " |")
    lines += [
        "",
        "In brackets: measured throughput over the latency model's prediction, minus one.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export-images", metavar="FILE", help="write the inputs, then stop")
    parser.add_argument("--count", type=int, default=2048, help="images --export-images writes")
    parser.add_argument("--images", metavar="FILE", help="the file --export-images wrote")
    parser.add_argument(
        "--members-dir", default=str(ROOT / "outputs" / "members" / "cifar10-small_cnn")
    )
    parser.add_argument(
        "--thresholds", nargs="+", default=list(DEFAULT_THRESHOLDS), metavar="LABEL:PATH"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latency-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-batches", type=int, default=5)
    parser.add_argument("--profile-seconds", type=float, default=12.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument(
        "--render",
        nargs="+",
        metavar="JSON",
        help="print (and --update-docs) results: the first in full, all as a serving-batch sweep",
    )
    parser.add_argument("--update-docs", action="store_true", help="rewrite BENCHMARKS.md's table")
    parser.add_argument("overrides", nargs="*", help="config overrides for --export-images")
    args = parser.parse_args()
    retain_freed_memory()  # as every flexens process runs (flexens.allocator)
    if args.export_images:
        export_images(
            Path(args.export_images), args.count, args.overrides or ["experiment=cifar10"]
        )
        return
    command = "python benchmarks/gpu.py --images FILE --device cuda"
    if args.render:
        results = [json.loads(Path(path).read_text()) for path in args.render]
        section = markdown(results[0], command)
        if len(results) > 1:
            section += "\n" + batch_sweep(results)
    else:
        if not args.images:
            parser.error("--images FILE is needed (write one with --export-images FILE)")
        result = run(args)
        write_json(args.out, result)
        section = markdown(result, command)
        write_text(Path(args.out).with_suffix(".md"), section)
        print(f"results: {args.out}")
    if args.update_docs:
        replace_marked_section(ROOT / "BENCHMARKS.md", "gpu", section)
    print(section)


if __name__ == "__main__":
    main()
