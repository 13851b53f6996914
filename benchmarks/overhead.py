"""What does ``FlexibleEnsembleModule`` cost on top of the members themselves?

Two acceptance targets, measured in one run on one machine:

* ``full`` mode vs a hand-written loop ``sum(softmax(m(x))) / N`` over the same members, at
  batch 1 and at the serving batch: time ratio ≤ 1.03.
* ``flexible`` mode at the serving batch runs each member on the still-undecided samples
  only, so its throughput gain over ``full`` should be what the exit stages predict:
  ``Σ_k B·c_k / Σ_k reach_k·c_k`` with ``c_k`` member k's cost per image at the serving
  batch and ``reach_k`` how many samples reach stage k. Measured within 15 % of predicted.

Members: the trained CIFAR-10 ensemble (with its calibrated thresholds and real test images)
when it exists, else five randomly initialised small CNNs on random inputs with thresholds
that halt about half of the samples reaching each stage. Run:
``python benchmarks/overhead.py [--synthetic] [--batch 256] [--threads 2]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from flexens.allocator import retain_freed_memory
from flexens.artifacts import write_json
from flexens.data import ImageFolderDataModule
from flexens.ensemble import FlexibleEnsembleModule
from flexens.halting import Criterion, get_criterion, should_halt, stage_outputs
from flexens.latency import expected_throughput, interleaved, machine_info, reach_fractions
from flexens.members.networks import SmallConvNet
from flexens.members.registry import Member, find_member_paths, load_ensemble

ROOT = Path(__file__).resolve().parents[1]
MAX_FULL_RATIO = 1.03
"""``full`` mode may be at most 3 % slower than the plain loop."""
GAIN_TOLERANCE = 0.15
"""Measured flexible gain within ±15 % of the exit-stage prediction."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--members-dir",
        type=Path,
        default=ROOT / "outputs/members/cifar10-small_cnn",
        help="trained members (seed=<n>.safetensors + .json); synthetic ones if it holds none",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="random-init small CNNs on random inputs, whatever is on disk",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=ROOT.parent / "shared/data/cifar10",
        help="CIFAR-10 ImageFolder tree, for real test images",
    )
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "outputs/cache")
    parser.add_argument("--image-size", type=int, default=32, help="side of random inputs")
    parser.add_argument("--batch", type=int, default=256, help="serving batch size")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per mode at --batch")
    parser.add_argument(
        "--batch1-calls", type=int, default=300, help="timed calls per mode at batch 1"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/overhead.json")
    return parser.parse_args(argv)


# -- members, inputs and thresholds ---------------------------------------------------------
def synthetic_setup(args: argparse.Namespace) -> dict:
    """Five random-init CIFAR-sized CNNs on random inputs: runs anywhere, trains nothing."""
    torch.manual_seed(args.seed)
    networks = [
        SmallConvNet(num_classes=10, in_chans=3, width=16, depth=4).eval() for _ in range(5)
    ]
    return {
        "source": "synthetic",
        "networks": networks,
        "criterion": "margin",
        "inputs": random_inputs(args, 3),
        "input_source": "random",
        "thresholds": None,
    }


def random_inputs(args: argparse.Namespace, in_chans: int) -> Tensor:
    """Zero-mean unit-variance images, as normalised real images roughly are."""
    g = torch.Generator().manual_seed(args.seed)
    return torch.randn(args.batch, in_chans, args.image_size, args.image_size, generator=g)


def cifar_test_images(args: argparse.Namespace) -> Tensor:
    """A seeded random sample of the test split (the tree is sorted by class), normalised
    as at evaluation, so exit stages are the ones real inputs get."""
    dm = ImageFolderDataModule(
        root=str(args.data_root),
        name="cifar10",
        train_split="train",
        test_split="test",
        preset="cifar",
        image_size=32,
        cache_decoded=True,
        cache_dir=str(args.cache_dir),
    )
    dm.setup()
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(dm.test_set), generator=g)[: args.batch].tolist()
    return torch.stack([dm.test_set[i][0] for i in picks])


def load_members(members_dir: Path) -> tuple[list[Member], list[float] | None, str, str]:
    """Members with their calibrated thresholds and criterion when thresholds.json exists."""
    thresholds_file = members_dir / "thresholds.json"
    if not thresholds_file.is_file():
        return load_ensemble(members_dir), None, "margin", "median"
    # Imported here: it pulls in the loggers (wandb), seconds the synthetic path can skip.
    from flexens.inference import load_calibrated_members

    members, calibration = load_calibrated_members(thresholds_file, members_dir)
    return members, list(calibration.thresholds), calibration.criterion, str(thresholds_file)


def real_setup(args: argparse.Namespace) -> dict:
    """The trained ensemble; CIFAR test images when it is a CIFAR-10 ensemble."""
    members, thresholds, criterion, thresholds_source = load_members(args.members_dir)
    is_cifar = members[0].meta.get("data", {}).get("name") == "cifar10"
    use_cifar = is_cifar and args.data_root.is_dir()
    inputs = (
        cifar_test_images(args)
        if use_cifar
        else random_inputs(args, int(members[0].arch.get("in_chans", 3)))
    )
    return {
        "source": str(args.members_dir),
        "networks": [m.network for m in members],
        "criterion": criterion,
        "inputs": inputs,
        "input_source": "cifar10-test" if use_cifar else "random",
        "thresholds": thresholds,
        "thresholds_source": thresholds_source,
    }


def has_members(members_dir: Path) -> bool:
    """Whether trained members exist, so a fresh checkout falls back instead of failing."""
    try:
        find_member_paths(members_dir)
    except FileNotFoundError:
        return False
    return True


def median_thresholds(
    networks: Sequence[nn.Module], x: Tensor, criterion: Criterion
) -> list[float]:
    """``T_k`` = median stage-k confidence of the samples still undecided at stage k.

    About half of the samples reaching each stage halt there, so every stage runs on a
    different subset size whatever the networks (random-init ones included).
    """
    with torch.inference_mode():
        probs = torch.stack([net(x).float().softmax(dim=-1) for net in networks])
    confidence, _ = stage_outputs(probs, criterion)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds = []
    for k in range(len(networks) - 1):
        t = float(confidence[k, active].median()) if active.any() else 1.0
        thresholds.append(t)
        active &= ~should_halt(confidence[k], t, is_last=False)
    return thresholds


def setup(args: argparse.Namespace) -> dict:
    """Real members when asked for and present, else the synthetic fallback."""
    use_real = not args.synthetic and has_members(args.members_dir)
    if not use_real and not args.synthetic:
        print(f"no members in {args.members_dir}; using the synthetic ensemble")
    bench = real_setup(args) if use_real else synthetic_setup(args)
    if bench["thresholds"] is None:
        bench["thresholds"] = median_thresholds(
            bench["networks"], bench["inputs"], get_criterion(bench["criterion"])
        )
        bench["thresholds_source"] = "median"
    return bench


# -- timing ---------------------------------------------------------------------------------
def plain_loop(networks: Sequence[nn.Module], x: Tensor) -> Tensor:
    """The hand-written baseline ``full`` mode must not be slower than: the one loop a
    benchmark keeps, because it is the reference the package is measured against."""
    return sum(net(x).softmax(dim=-1) for net in networks) / len(networks)


def compare(full: np.ndarray, loop: np.ndarray, batch: int) -> dict:
    """Ratio of median times (the target), and the median of same-round ratios, which
    shrugs off load that changes between rounds: the two disagreeing means noise."""
    ratio = float(np.median(full) / np.median(loop))
    return {
        "batch": batch,
        "full_ms": float(np.median(full) * 1e3),
        "loop_ms": float(np.median(loop) * 1e3),
        "ratio": ratio,
        "paired_ratio": float(np.median(full / loop)),
        "rounds": len(full),
        "passed": ratio <= MAX_FULL_RATIO,
    }


def flexible_gain(times: dict[str, np.ndarray], histogram: np.ndarray, batch: int) -> dict:
    """Measured gain of flexible over full against two predictions from the exit histogram.

    ``predicted_gain`` (the target) prices every stage at its member's cost per image at the
    full batch. ``predicted_gain_at_subsets`` times each member on as many samples as reach
    its stage: on a CPU smaller batches can cost less per image (they fit in cache), and
    the gap between the two predictions is that hardware effect, not the module's overhead.
    """
    reach = histogram[::-1].cumsum()[::-1]  # how many samples run member k
    members = range(len(histogram))
    batch_s = np.array([np.median(times[f"member{k}"]) for k in members])
    subset_s = np.array([np.median(times[f"subset{k}"]) if reach[k] else 0.0 for k in members])
    cost = batch_s / batch
    profile = {"members": [{"batched_ms_per_image": c * 1e3} for c in cost]}  # this run's
    exits = np.repeat(np.arange(len(histogram)), histogram)
    predicted = expected_throughput(profile, reach_fractions(exits, len(histogram))) / (
        expected_throughput(profile, np.ones(len(histogram)))
    )
    full_s, flexible_s = float(np.median(times["full"])), float(np.median(times["flexible"]))
    measured = full_s / flexible_s
    return {
        "batch": batch,
        "exit_histogram": histogram.tolist(),
        "reach": reach.tolist(),
        "avg_members": float((histogram * np.arange(1, len(histogram) + 1)).sum() / batch),
        "member_ms_per_image": (cost * 1e3).tolist(),
        "member_ms_at_subsets": (subset_s * 1e3).tolist(),
        "full_ms": full_s * 1e3,
        "flexible_ms": flexible_s * 1e3,
        "full_img_s": batch / full_s,
        "flexible_img_s": batch / flexible_s,
        "measured_gain": measured,
        "predicted_gain": predicted,
        "ratio": measured / predicted,
        "predicted_gain_at_subsets": float(batch_s.sum() / subset_s.sum()),
        "ratio_at_subsets": float(measured * subset_s.sum() / batch_s.sum()),
        "passed": abs(measured / predicted - 1.0) <= GAIN_TOLERANCE,
    }


def run(args: argparse.Namespace) -> dict:
    """Batch 1: full vs loop. Serving batch: loop, full, flexible, and each member alone on
    the whole batch and on the samples that reach it, interleaved, so every comparison
    rests on timings taken under the same load."""
    bench = setup(args)
    networks, x = bench["networks"], bench["inputs"]
    modules = {
        mode: FlexibleEnsembleModule(networks, bench["thresholds"], bench["criterion"], mode=mode)
        for mode in ("full", "flexible")
    }
    with torch.inference_mode():
        exit_stage = modules["flexible"](x).exit_stage
    histogram = torch.bincount(exit_stage, minlength=len(networks)).numpy()
    reach = histogram[::-1].cumsum()[::-1]
    one = x[:1]
    single = interleaved(
        {"full": lambda: modules["full"](one), "loop": lambda: plain_loop(networks, one)},
        args.batch1_calls,
        warmup=max(args.warmup, 20),
        seed=args.seed,
    )
    batched = interleaved(
        {
            "loop": lambda: plain_loop(networks, x),
            "full": lambda: modules["full"](x),
            "flexible": lambda: modules["flexible"](x),
            **{f"member{k}": (lambda net=net: net(x)) for k, net in enumerate(networks)},
            **{
                f"subset{k}": (lambda net=net, part=x[: reach[k]]: net(part))
                for k, net in enumerate(networks)
                if reach[k]
            },
        },
        args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )
    return {
        "benchmark": "overhead",
        "machine": machine_info(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "members": {
            "source": bench["source"],
            "count": len(networks),
            "inputs": bench["input_source"],
            "input_shape": list(x.shape[1:]),
            "criterion": bench["criterion"],
            "thresholds": bench["thresholds"],
            "thresholds_source": bench["thresholds_source"],
        },
        "full_vs_loop": [
            compare(single["full"], single["loop"], 1),
            compare(batched["full"], batched["loop"], x.shape[0]),
        ],
        "flexible": flexible_gain(batched, histogram, x.shape[0]),
        "targets": {"full_max_ratio": MAX_FULL_RATIO, "gain_tolerance": GAIN_TOLERANCE},
    }


def report(result: dict) -> None:
    """The figures a reader checks, one PASS/FAIL line per target."""
    m, members = result["machine"], result["members"]
    print(f"machine: {m['device']}, {m['cpu_count']} CPUs, torch {m['torch']}")
    print(
        f"members: {members['count']} from {members['source']}, inputs {members['inputs']}, "
        f"thresholds {members['thresholds_source']}"
    )
    print(f"{'batch':>6}{'rounds':>8}{'full ms':>11}{'loop ms':>11}{'ratio':>8}{'paired':>8}")
    for row in result["full_vs_loop"]:
        print(
            f"{row['batch']:>6}{row['rounds']:>8}{row['full_ms']:>11.3f}{row['loop_ms']:>11.3f}"
            f"{row['ratio']:>8.3f}{row['paired_ratio']:>8.3f}"
        )
    flex = result["flexible"]
    print(
        f"flexible at batch {flex['batch']}: exit histogram {flex['exit_histogram']}, "
        f"{flex['flexible_img_s']:.0f} vs {flex['full_img_s']:.0f} img/s (full)"
    )
    for row in result["full_vs_loop"]:
        print(
            f"{verdict(row['passed'])}: full/loop at batch {row['batch']} = {row['ratio']:.3f} "
            f"(target ≤ {MAX_FULL_RATIO})"
        )
    print(
        f"{verdict(flex['passed'])}: flexible gain {flex['measured_gain']:.2f}× measured vs "
        f"{flex['predicted_gain']:.2f}× predicted, ratio {flex['ratio']:.3f} "
        f"(target 1 ± {GAIN_TOLERANCE})"
    )
    print(
        f"info: priced at the subset sizes that reach each stage, predicted "
        f"{flex['predicted_gain_at_subsets']:.2f}×, ratio {flex['ratio_at_subsets']:.3f}"
    )


def verdict(passed: bool) -> str:
    """The word a reader scans the output for."""
    return "PASS" if passed else "FAIL"


def main() -> None:
    args = parse_args()
    retain_freed_memory()  # as every flexens process runs (flexens.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    result["passed"] = (
        all(row["passed"] for row in result["full_vs_loop"]) and result["flexible"]["passed"]
    )
    report(result)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
