"""Wall-clock profiling on the target device, and the latency model built from it.

The expected latency of a threshold set is ``Σ_k P(reach stage k) · t_k`` with ``t_k`` the
member's batch-1 latency plus the metareasoner's own per-stage cost (averaging and the
criterion). That model is only as good as the ``t_k`` it is fed, and wall clocks on a shared
machine drift and spike. So every figure here comes from one timer (:func:`timed_call`),
contenders are timed *interleaved* in rounds (a slow phase hits all of them alike), the
statistic is the mean over rounds without the calls that took more than
:data:`SPIKE_FACTOR` × the median (the mean is what the model predicts and what the
headline reports; a call that slow is a descheduled process, not the member's cost), and
repeats stop as soon as that mean is stable or the time budget is spent. Members of one
architecture do the same arithmetic, so their costs must agree: one that does not is
measured again, and replaced by its twins' median with a warning if it still disagrees.
Thread count changes a small network's cost by 2× on a CPU, so it is chosen per batch size
and recorded with the device, the batch size, the torch version and the members'
inference form; a profile measured under other conditions is stale and measured again.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from flexens.allocator import retain_freed_memory
from flexens.calibration.schema import PROFILE_FORMAT
from flexens.cuda_graphs import graphed_members
from flexens.execution import probability_fn, run_flexible
from flexens.fused import FusedMembers, architecture_key, can_fuse
from flexens.halting import Criterion
from flexens.members.inference_form import INFERENCE_FORM
from flexens.staged import StagedStream

OUTLIER_TOLERANCE = 0.25
"""Members of one architecture whose costs differ from their twins' median by more than
this fraction are measured again (then replaced by that median, with a warning)."""
SPIKE_FACTOR = 3.0
"""Calls slower than this many times their median are left out of a profile's means."""
QUICK_CHECK_TOLERANCE = 0.50
"""A stored profile whose batch-1 ensemble cost is further than this from a quick
re-measurement is stale."""
BATCH1_SLICE = 20
"""Batch-1 timing runs each configuration over at most this many inputs per round."""
FUSED_MIN_GAIN = 0.05
"""Fused continuation is used only where the model expects it at least this much cheaper."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device={name!r} is not a device torch knows; use device=auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not supported; use device=auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name!r} asked for but no CUDA GPU is visible; use device=cpu or auto"
        )
    return device


def device_name(device: torch.device) -> str:
    """The processor's model name; thread counts are recorded separately."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return cpu


def machine_info(device: torch.device | None = None) -> dict:
    """Where figures come from: timings are only comparable on the same machine."""
    return {
        "device": device_name(device or torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# -- the one timer -------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (synchronised before and after on a GPU) and its
    result: every timing in flexens (profile, ``infer.py``, benchmarks) is made of these."""
    device = device or torch.device("cpu")
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (see :func:`timed`)."""
    return timed(fn, device)[0]


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> np.ndarray:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        return np.array([timed_call(fn, device) for _ in range(repeats)])


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Seconds per call of each function, one call each per round in a fresh random order:
    drifting machine load, and whatever one call leaves behind for the next (caches, the
    allocator), hit every contender alike."""
    device = device or torch.device("cpu")
    names = list(fns)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for _ in range(rounds):
            for i in rng.permutation(len(names)):
                times[names[i]].append(timed_call(fns[names[i]], device))
    return {name: np.array(t) for name, t in times.items()}


def without_spikes(times: Sequence[float]) -> np.ndarray:
    """The calls that took at most :data:`SPIKE_FACTOR` × the median."""
    times = np.asarray(times, dtype=float)
    return times[times <= SPIKE_FACTOR * float(np.median(times))]


def robust_mean(times: Sequence[float]) -> float:
    """Mean seconds per call without spikes: the profile's statistic."""
    return float(without_spikes(times).mean())


def relative_error(times: np.ndarray) -> float:
    """Standard error of :func:`robust_mean` relative to it: the stopping rule of
    :func:`adaptive_interleaved`."""
    kept = without_spikes(times) if len(times) else np.empty(0)
    if len(kept) < 2:
        return float("inf")
    return float(kept.std(ddof=1) / np.sqrt(len(kept)) / max(kept.mean(), 1e-12))


@dataclass(frozen=True)
class Budget:
    """How long a measurement may take: rounds stop when every contender's mean is
    within ``rel_error`` (see :func:`relative_error`) or ``seconds`` are spent."""

    seconds: float = 4.0
    rel_error: float = 0.03
    min_rounds: int = 10
    max_rounds: int = 400


def adaptive_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    budget: Budget,
    label: str = "",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """:func:`interleaved` one round at a time until the means are stable or one more
    round would overrun the budget (at least one round is always timed), with a progress
    line on stderr (twice a second)."""
    times = {name: np.empty(0) for name in fns}
    start = shown = time.perf_counter()
    interleaved(fns, rounds=0, warmup=1, device=device)
    for r in range(budget.max_rounds):
        round_start = time.perf_counter()
        one = interleaved(fns, rounds=1, warmup=0, seed=seed + r, device=device)
        times = {name: np.append(times[name], one[name]) for name in fns}
        worst = max(relative_error(t) for t in times.values())
        now = time.perf_counter()
        if label and now - shown > 0.5:
            shown = now
            print(
                f"\rprofiling {label}: round {r + 1}, ±{min(worst, 9.99):.0%}, {now - start:.0f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        stable = r + 1 >= budget.min_rounds and worst <= budget.rel_error
        if stable or now - start + (now - round_start) > budget.seconds:
            break
    if label and shown > start:
        print(file=sys.stderr)
    return times


def summarize(times: np.ndarray, images_per_call: int = 1) -> dict:
    """The latency figures of one configuration, ms per call: the mean (the paper's
    metric, and the one an exit distribution's cost model predicts) with p50/p90/p99."""
    ms = np.asarray(times) * 1e3
    return {
        "latency_mean_ms": float(ms.mean()),
        "latency_p50_ms": float(np.quantile(ms, 0.5)),
        "latency_p90_ms": float(np.quantile(ms, 0.9)),
        "latency_p99_ms": float(np.quantile(ms, 0.99)),
        "throughput_img_s": float(images_per_call * len(ms) / max(ms.sum() / 1e3, 1e-12)),
    }


# -- threads ---------------------------------------------------------------------------------
def thread_candidates(device: torch.device) -> list[int]:
    """Intra-op thread counts worth trying: one, and what torch would use (a GPU: as is)."""
    if device.type != "cpu":
        return [torch.get_num_threads()]
    return sorted({1, torch.get_num_threads()})


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the profile -----------------------------------------------------------------------------
def architecture_id(network: nn.Module) -> str:
    """A short name for a network's architecture: members sharing it must cost the same."""
    import hashlib

    return hashlib.sha256(repr(architecture_key(network)).encode()).hexdigest()[:12]


def outliers(costs: Sequence[float], archs: Sequence[str], tolerance: float) -> list[int]:
    """Members whose cost is off their same-architecture twins' median by > ``tolerance``."""
    costs, archs = np.asarray(costs, dtype=float), np.asarray(archs)
    flagged = []
    for arch in dict.fromkeys(archs.tolist()):
        group = np.flatnonzero(archs == arch)
        if len(group) < 2:
            continue
        median = float(np.median(costs[group]))
        flagged += [int(i) for i in group if abs(costs[i] / median - 1.0) > tolerance]
    return flagged


def twin_median(costs: np.ndarray, archs: Sequence[str], index: int) -> float:
    same = [c for c, a in zip(costs, archs, strict=True) if a == archs[index]]
    return float(np.median(same))


def as_run(networks: Sequence[nn.Module], device: torch.device) -> list[nn.Module]:
    """The members as inference runs them on ``device``: replayed from CUDA graphs on a GPU
    (``infer.cuda_graphs``, on by default: :mod:`flexens.cuda_graphs`), as they are elsewhere."""
    return graphed_members(networks) if device.type == "cuda" else list(networks)


def member_costs(
    networks: Sequence[nn.Module],
    x: torch.Tensor,
    device: torch.device,
    budget: Budget,
    label: str,
) -> tuple[np.ndarray, list[dict]]:
    """Mean ms per image of each member on ``x`` (:func:`robust_mean`), interleaved;
    disagreeing twins are measured again, then replaced by their twins' median with a
    warning."""
    archs = [architecture_id(n) for n in networks]
    fns = {str(i): (lambda net=net: net(x)) for i, net in enumerate(as_run(networks, device))}

    def measure(seed: int) -> np.ndarray:
        times = adaptive_interleaved(fns, device, budget, label, seed=seed)
        return np.array([robust_mean(times[str(i)]) * 1e3 / len(x) for i in range(len(fns))])

    costs = measure(0)
    if outliers(costs, archs, OUTLIER_TOLERANCE):
        costs = measure(1)
    replaced = []
    for i in outliers(costs, archs, OUTLIER_TOLERANCE):
        twin = twin_median(costs, archs, i)
        print(
            f"warning: member {i} measured {costs[i]:.3f} ms/image at batch {len(x)} with "
            f"{torch.get_num_threads()} threads, its same-architecture twins {twin:.3f}, twice; "
            "using theirs (a busy machine?)"
        )
        replaced.append({"member": i, "batch": len(x), "measured_ms": float(costs[i])})
        costs[i] = twin
    return costs, replaced


def fused_suffix_ms(
    fused: FusedMembers, one: torch.Tensor, device: torch.device, budget: Budget
) -> list[float]:
    """Batch-1 ms of running members ``k..N-1`` fused, for ``k = 0..N-2``."""
    fns = {str(k): (lambda k=k: fused(one, k)) for k in range(fused.num_members - 1)}
    times = adaptive_interleaved(fns, device, budget, "fused members, batch 1")
    return [robust_mean(times[str(k)]) * 1e3 for k in range(fused.num_members - 1)]


def curve_batch_sizes(batch_size: int) -> list[int]:
    """Batch sizes whose per-image cost the profile records besides 1 and the serving batch.

    Halting shrinks the batch stage by stage: at a serving batch of 256, later members see
    a few to tens of samples, and a call's cost there is not proportional to its size. On a
    CPU it jumps between batch 1 and 4 (a digits member: 0.57 ms at 1, 1.78 at 4, 2.08 at
    16) and on a GPU it hardly moves below a few hundred, so the points are dense where
    sub-batches are small: every power of two up to ``B/4``, and ``B/16``, ``B/4``. The
    model interpolates a call's time between them.
    """
    powers = {1 << k for k in range(1, max(batch_size // 4, 1).bit_length())}
    return sorted(s for s in powers | {batch_size // 16, batch_size // 4} if 1 < s < batch_size)


def recorded_batch_sizes(batch_size: int) -> list[int]:
    """Every batch size a profile's ``curve_ms_per_image`` holds: 1, the curve, ``B``."""
    return [1, *curve_batch_sizes(batch_size), int(batch_size)]


def profile_at_threads(
    networks: Sequence[nn.Module],
    example: torch.Tensor,
    batch_size: int,
    device: torch.device,
    budget: Budget,
) -> dict:
    """Members at batch 1, at the serving batch and at the sizes of
    :func:`curve_batch_sizes` (and fused suffixes at batch 1), at the current thread count."""
    threads = torch.get_num_threads()

    def batch_of(size: int) -> torch.Tensor:
        return example[:1].expand(size, *example.shape[1:]).contiguous().to(device)

    one = example[:1].to(device)
    b1, replaced1 = member_costs(networks, one, device, budget, f"batch 1, {threads} thr")
    bb, replaced_b = member_costs(
        networks, batch_of(batch_size), device, budget, f"batch {batch_size}, {threads} thr"
    )
    sizes = curve_batch_sizes(batch_size)
    curve = [
        member_costs(
            networks,
            batch_of(size),
            device,
            replace(budget, seconds=budget.seconds / len(sizes)),
            f"batch {size}, {threads} thr",
        )
        for size in sizes
    ]
    fused = (
        fused_suffix_ms(FusedMembers(networks).to(device), one, device, budget)
        if can_fuse(networks)
        else None
    )
    return {
        "batch1_ms": b1.tolist(),
        "batched_ms_per_image": bb.tolist(),
        "curve_ms_per_image": [costs.tolist() for costs, _ in curve],
        "fused_batch1_ms": fused,
        "replaced": replaced1 + replaced_b + [r for _, replaced in curve for r in replaced],
    }


class _FixedLogits(nn.Module):
    """A member that costs nothing: the same logits for every input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def profile_overhead(
    criterion: Criterion,
    num_classes: int,
    num_members: int,
    device: torch.device,
    repeats: int = 200,
) -> float:
    """Mean ms at batch 1 that the halting loop itself adds per stage.

    Timed through :func:`flexens.execution.run_flexible` with members that cost nothing
    and thresholds no sample passes, so every stage runs its full bookkeeping (softmax,
    running mean, criterion, the halting decision and its host sync, scattering results
    back). On a small CPU network that is several percent of a member's cost; the
    softmax and criterion alone are a fraction of it.
    """
    logits = torch.randn(1, num_classes, device=device)
    n = max(int(num_members), 2)
    members = [_FixedLogits(logits) for _ in range(n)]
    never = [1e9] * (n - 1)
    one = torch.zeros(1, 1, device=device)
    seconds = robust_mean(
        time_calls(lambda: run_flexible(members, one, never, criterion), device, 20, repeats)
    )
    return seconds * 1e3 / n


class _HalfConfident(nn.Module):
    """A member that costs nothing and leaves half of every call undecided: even rows are
    certain of class 0, odd rows undecided between all classes."""

    def __init__(self, num_classes: int, rows: int, device: torch.device) -> None:
        super().__init__()
        self.logits = torch.zeros(rows, num_classes, device=device)
        self.logits[0::2, 0] = 30.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def profile_staged_overhead(
    criterion: Criterion,
    num_classes: int,
    num_members: int,
    example: torch.Tensor,
    batch_size: int,
    device: torch.device,
    budget: Budget,
) -> float:
    """Mean ms a staged stream (:mod:`flexens.staged`) adds per member call at the serving
    batch: its halting decision and host sync, gathering the samples that go on and
    concatenating a stage's queue into a batch. Timed through the real stream with members
    that cost nothing and let half of every call go on, about what the CIFAR-10 members do
    (each later stage passes on 40-80 % of what reaches it); the gathering copies the
    inputs, so it is measured at their real shape, within ``budget``."""
    n = max(int(num_members), 2)
    member = probability_fn(_HalfConfident(num_classes, batch_size, device))
    calls = 0

    def counted(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return member(x)

    stream = StagedStream([counted] * n, [0.5] * (n - 1), criterion, batch_size)
    batch = example[:1].to(device).expand(batch_size, *example.shape[1:]).contiguous()

    def one_stream() -> None:
        for _ in range(n):
            stream.push(batch)
        stream.finish()

    with torch.inference_mode():
        one_stream()
    calls_per_stream = calls
    times = adaptive_interleaved({"staged": one_stream}, device, budget)["staged"]
    return robust_mean(times) * 1e3 / calls_per_stream


def best_threads(by_threads: dict[str, dict], key: str) -> str:
    """The thread count (a key of ``by_threads``) whose members sum to the least ``key``."""
    return min(by_threads, key=lambda t: sum(by_threads[t][key]))


def latency_profile(
    networks: Sequence[nn.Module],
    member_hashes: Sequence[str],
    example: torch.Tensor,
    batch_size: int,
    device: torch.device,
    criterion: Criterion,
    num_classes: int,
    seconds: float = 12.0,
    threads: Sequence[int] | None = None,
) -> dict:
    """Every member's cost at batch 1 and at ``batch_size`` for each candidate thread count,
    within about ``seconds``; the thread count that makes the ensemble cheapest is chosen
    per batch size and its costs are the members' ``batch1_ms``/``batched_ms_per_image``.
    Freed memory is kept in the process first, as every flexens process runs
    (:mod:`flexens.allocator`), and the profile records whether that took effect."""
    start = time.perf_counter()
    retains = retain_freed_memory()
    networks = [n.to(device).eval() for n in networks]
    candidates = list(threads or thread_candidates(device))
    budget = Budget(seconds=seconds / (4 * len(candidates)))
    by_threads = {}
    for threads in candidates:
        with num_threads(threads):
            by_threads[str(threads)] = profile_at_threads(
                networks, example, batch_size, device, budget
            )
    best = {key: best_threads(by_threads, key) for key in ("batch1_ms", "batched_ms_per_image")}
    archs = [architecture_id(n) for n in networks]
    batched = by_threads[best["batched_ms_per_image"]]
    members = [
        {
            "sha256": h,
            "arch": archs[i],
            "batch1_ms": by_threads[best["batch1_ms"]]["batch1_ms"][i],
            "batched_ms_per_image": batched["batched_ms_per_image"][i],
            "curve_ms_per_image": [
                batched["batch1_ms"][i],
                *(costs[i] for costs in batched["curve_ms_per_image"]),
                batched["batched_ms_per_image"][i],
            ],
        }
        for i, h in enumerate(member_hashes)
    ]
    with num_threads(int(best["batch1_ms"])):
        overhead = profile_overhead(criterion, num_classes, len(networks), device)
    with num_threads(int(best["batched_ms_per_image"])):
        staged_overhead = profile_staged_overhead(
            criterion, num_classes, len(networks), example, batch_size, device, budget
        )
    return {
        "format": PROFILE_FORMAT,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "network_form": INFERENCE_FORM,
        "cuda_graphs": device.type == "cuda",
        "retains_freed_memory": retains,
        "thread_candidates": candidates,
        "threads": {"batch1": int(best["batch1_ms"]), "batched": int(best["batched_ms_per_image"])},
        "batch_size": batch_size,
        "curve_batch_sizes": recorded_batch_sizes(batch_size),
        "input_shape": list(example.shape[1:]),
        "statistic": f"mean of interleaved rounds without calls over {SPIKE_FACTOR:g}x the median",
        "members": members,
        "fused_batch1_ms": by_threads[best["batch1_ms"]]["fused_batch1_ms"],
        "by_threads": by_threads,
        "overhead_ms": overhead,
        "staged_overhead_ms": staged_overhead,
        "profiling_s": time.perf_counter() - start,
        "measured_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# -- the latency model -----------------------------------------------------------------------
def stage_costs_ms(profile: dict, fuse_from: int | None = None) -> np.ndarray:
    """Per-stage cost at batch 1: the member plus the halting bookkeeping.

    With ``fuse_from = f`` the samples that reach stage ``f`` run members ``f..N-1`` in one
    fused call and then pay nothing more: stage ``f`` costs the fused suffix and the
    bookkeeping of every remaining stage, later stages cost 0. The simulation's cumulative
    costs then price every exit exactly as the fused path executes it.
    """
    overhead = profile["overhead_ms"]
    costs = np.array([m["batch1_ms"] + overhead for m in profile["members"]])
    if fuse_from is None:
        return costs
    n = len(costs)
    costs[fuse_from] = profile["fused_batch1_ms"][fuse_from] + (n - fuse_from) * overhead
    costs[fuse_from + 1 :] = 0.0
    return costs


def reach_fractions(exit_stage: np.ndarray, num_members: int) -> np.ndarray:
    """Fraction of samples that run stage ``k``, from their (0-based) exit stages."""
    exit_stage = np.asarray(exit_stage)
    return np.array([(exit_stage >= k).mean() for k in range(num_members)])


def expected_latency_ms(profile: dict, reach: np.ndarray, fuse_from: int | None = None) -> float:
    """``Σ_k P(reach k) · t_k``: expected batch-1 ms per input."""
    return float(np.dot(reach, stage_costs_ms(profile, fuse_from)))


def stage_batch_ms(member: dict, sizes: Sequence[int] | None, samples: float) -> float:
    """Ms for one member to run ``samples`` samples in one batch: the call's time
    interpolated linearly in batch size between the member's recorded points, from zero
    for zero samples. A call costs a fixed part plus a part per sample, so its time, not
    its per-image cost, is what runs straight between two points: on an H100 a member's
    per-image cost falls from 115 µs at batch 1 to 3 µs at 64
    (``benchmarks/results/gpu_b1024.json``), and interpolating that in log batch size
    priced a sub-batch of 30 at about five times its cost. A profile without a curve (older
    flexens) prices every sample at the serving batch's cost."""
    curve = member.get("curve_ms_per_image")
    if not sizes or not curve:
        return float(samples * member["batched_ms_per_image"])
    calls = [0.0, *(size * cost for size, cost in zip(sizes, curve, strict=True))]
    return float(np.interp(samples, [0, *sizes], calls))


def expected_throughput(
    profile: dict, reach: np.ndarray, staged_images: int | None = None
) -> float:
    """Images/s at the serving batch ``B``: member ``k`` runs once per batch on the
    ``P(reach k)·B`` samples that reach it, at that sub-batch's cost, plus the halting
    loop's bookkeeping once for every stage that runs (on a GPU, with its host sync, about
    what a graphed member costs at batch 1).

    ``staged_images``: a staged stream (:mod:`flexens.staged`) of that many images instead.
    Member ``k`` runs full batches on the ``P(reach k)·images`` samples that reach it, and
    one partial batch with what is left when the stream ends; every call pays the stream's
    own bookkeeping (``staged_overhead_ms``: gathering and queueing cost more than batch by
    batch's halting step; a profile without it is priced with ``overhead_ms``). A short
    stream pays for its partial batches: 450 digits images at ``B = 256`` leave the later
    members a single call of a few dozen samples."""
    batch = profile.get("batch_size") or 1
    sizes = profile.get("curve_batch_sizes")
    overhead = profile.get("overhead_ms", 0.0)
    members = list(zip(profile["members"], reach, strict=True))
    if staged_images is None:
        ms = sum(
            stage_batch_ms(m, sizes, r * batch) + overhead * min(1.0, r * batch) for m, r in members
        )
        return float(1e3 * batch / ms)
    call = profile.get("staged_overhead_ms", overhead)
    ms = 0.0
    for m, r in members:
        full, rest = divmod(r * staged_images, batch)
        ms += full * (stage_batch_ms(m, sizes, batch) + call)
        ms += stage_batch_ms(m, sizes, rest) + call * min(1.0, rest)
    return float(1e3 * staged_images / ms)


def best_fuse_from(profile: dict, reach: np.ndarray) -> int | None:
    """The stage after which fused continuation makes the expected batch-1 latency lowest,
    or None when the sequential loop is as cheap (within :data:`FUSED_MIN_GAIN`)."""
    if not profile.get("fused_batch1_ms"):
        return None
    sequential = expected_latency_ms(profile, reach)
    options = {f: expected_latency_ms(profile, reach, f) for f in range(1, len(reach) - 1)}
    if not options:
        return None
    f = min(options, key=options.get)
    return f if options[f] < (1.0 - FUSED_MIN_GAIN) * sequential else None


# -- staleness ---------------------------------------------------------------------------------
def profile_problems(
    profile: dict, device: torch.device, batch_size: int, input_shape: Sequence[int]
) -> list[str]:
    """Why a stored profile does not describe this machine and setting (empty: it does)."""
    if profile.get("format") != PROFILE_FORMAT:
        return [f"it has format {profile.get('format')!r}, this flexens writes {PROFILE_FORMAT!r}"]
    expected = {
        "device": device_name(device),
        "torch": torch.__version__,
        "network_form": INFERENCE_FORM,
        "thread_candidates": thread_candidates(device),
        "batch_size": int(batch_size),
        "curve_batch_sizes": recorded_batch_sizes(batch_size),
        "input_shape": list(input_shape),
        "cuda_graphs": device.type == "cuda",
        "retains_freed_memory": retain_freed_memory(),  # what profiling now would record
    }
    problems = [
        f"{key} was {profile.get(key)!r}, now {value!r}"
        for key, value in expected.items()
        if profile.get(key) != value
    ]
    if "staged_overhead_ms" not in profile:
        problems.append("it predates the staged stream's own bookkeeping (staged_overhead_ms)")
    members = profile["members"]
    archs = [m.get("arch", "") for m in members]
    for key in ("batch1_ms", "batched_ms_per_image"):
        bad = outliers([m[key] for m in members], archs, OUTLIER_TOLERANCE)
        problems += [f"member {i}'s {key} disagrees with its same-architecture twins" for i in bad]
    return problems


def quick_check(
    profile: dict,
    networks: Sequence[nn.Module],
    example: torch.Tensor,
    device: torch.device,
    seconds: float = 1.5,
) -> str | None:
    """Time the members at batch 1 for a moment: a problem line when their summed cost is
    off the profile's by more than :data:`QUICK_CHECK_TOLERANCE`, else None."""
    one = example[:1].to(device)
    fns = {str(i): (lambda net=net: net(one)) for i, net in enumerate(as_run(networks, device))}
    with num_threads(profile["threads"]["batch1"]):
        times = adaptive_interleaved(fns, device, Budget(seconds=seconds, rel_error=0.05))
    measured = sum(robust_mean(t) * 1e3 for t in times.values())
    stored = sum(m["batch1_ms"] for m in profile["members"])
    if abs(measured / stored - 1.0) <= QUICK_CHECK_TOLERANCE:
        return None
    return f"the members now take {measured:.2f} ms at batch 1, the profile says {stored:.2f} ms"


# -- measuring configurations against each other ----------------------------------------------
def timing_sample(total: int, count: int, seed: int = 0) -> list[int]:
    """Which ``count`` of ``total`` test samples a timing runs, in the order it runs them: a
    seeded random sample. An ImageFolder split is sorted by class, so its first images are
    one class: the first 500 CIFAR-10 test images are airplanes, which stop after 1.72
    members on average at the default operating point against 1.92 over the split, and a
    batch of consecutive images holds one or two classes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[: min(count, total)].tolist()


@runtime_checkable
class Stream(Protocol):
    """A configuration whose calls leave work for later calls (a staged flexible ensemble,
    :mod:`flexens.staged`): its time over a stream includes ``finish``, which runs what
    still waits; ``fresh`` is an empty copy, so two timed thread counts never share work."""

    def __call__(self, x: torch.Tensor) -> object: ...

    def finish(self) -> object: ...

    def fresh(self) -> Stream: ...


def time_rounds(
    fns: dict[str, Callable[[torch.Tensor], object]],
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seconds per input of each configuration: ``inputs`` is cut into ``rounds`` slices,
    and each round runs every configuration over its slice in a fresh random order. A
    :class:`Stream` is emptied after its warm-up, and its ``finish`` after the last round
    is timed as one more call: the stream's time is the whole pass."""
    names = list(fns)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round = max(1, -(-len(inputs) // rounds))
    with torch.inference_mode():
        for name in names:  # warm-up: allocator, thread pool, first-call paths
            for i in range(warmup):
                fns[name](inputs[i % len(inputs)])
            if isinstance(fns[name], Stream):
                fns[name].finish()
        for r in range(0, len(inputs), per_round):
            for i in rng.permutation(len(names)):
                fn = fns[names[i]]
                times[names[i]] += [
                    timed_call(lambda x=x, fn=fn: fn(x), device) for x in inputs[r : r + per_round]
                ]
        for name in names:
            if isinstance(fns[name], Stream):
                times[name].append(timed_call(fns[name].finish, device))
    return {n: np.array(t) for n, t in times.items()}


def measure_configurations(
    fns: dict[str, Callable[[torch.Tensor], object]],
    singles: torch.Tensor,
    stream: torch.Tensor,
    batch_size: int,
    device: torch.device,
    rounds: int = 5,
    warmup: int = 10,
    threads: dict[str, int] | None = None,
    explore: Sequence[str] | None = None,
    every_thread_count_at_batch1: bool = False,
) -> dict[str, dict]:
    """Batch-1 latency (mean, p50/p90/p99) and serving-batch throughput of each
    configuration, interleaved, reported at its best thread count for each batch size
    (recorded as ``threads_batch1``/``threads_batched``). A :class:`Stream` is timed for
    throughput only: at batch 1 it would be the configuration it stages.

    Every (configuration, thread count) pair runs in the same rounds, so a slow phase of a
    shared machine hits every thread count alike. ``threads`` (``{"batch1": t, "batched":
    t}``, the latency profile's choice) times the configurations not named in ``explore`` at
    that count only: the baselines are tried at every candidate count, the rest where the
    model says they run best, which halves the cost of a long table.
    ``every_thread_count_at_batch1`` tries every count for every configuration at batch 1,
    where a small network's best count is least stable.
    """
    singles, stream = singles.to(device), stream.to(device)
    ones, batches = list(singles.split(1)), list(stream.split(batch_size))
    candidates = thread_candidates(device)
    if threads is None or explore is None or not set(threads.values()) <= set(candidates):
        threads, explore = {"batch1": 0, "batched": 0}, list(fns)
    times: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    # at batch 1, rounds of at most BATCH1_SLICE calls: a slow phase of the machine then
    # spans every configuration's calls, not a few configurations' whole slice
    rounds_batch1 = max(rounds, -(-len(ones) // BATCH1_SLICE))
    for kind, inputs, r, w in (
        ("batch1", ones, rounds_batch1, warmup),
        ("batched", batches, rounds, 1),
    ):
        everywhere = set(explore) | (
            set(fns) if kind == "batch1" and every_thread_count_at_batch1 else set()
        )
        pairs = {
            (n, t): at_threads(fns[n], t)
            for t in candidates
            for n in fns
            if (n in everywhere or t == threads[kind])
            and not (kind == "batch1" and isinstance(fns[n], Stream))
        }
        with num_threads(torch.get_num_threads()):  # restored after the rounds
            measured = time_rounds(pairs, inputs, device, min(r, len(inputs)), w)
        for (n, t), v in measured.items():
            times.setdefault((n, kind), {})[t] = v
    results = {}
    for name in fns:
        batched = times[(name, "batched")]
        tb = min(batched, key=lambda t: batched[t].sum())
        results[name] = {
            "throughput_img_s": len(stream) / float(batched[tb].sum()),
            "threads_batched": tb,
        }
        if one := times.get((name, "batch1")):
            t1 = min(one, key=lambda t: one[t].mean())
            results[name] = summarize(one[t1]) | results[name] | {"threads_batch1": t1}
    return results


def at_threads(fn: Callable[[torch.Tensor], object], threads: int) -> Callable:
    """``fn`` run with ``threads`` intra-op threads (set inside the timed call: a few µs);
    a :class:`Stream` as an empty copy of its own."""
    if isinstance(fn, Stream):
        return _StreamAtThreads(fn.fresh(), threads)

    def run(x: torch.Tensor) -> object:
        torch.set_num_threads(threads)
        return fn(x)

    return run


class _StreamAtThreads:
    """A :class:`Stream` whose pushes and ``finish`` run with ``threads`` threads."""

    def __init__(self, stream: Stream, threads: int) -> None:
        self.stream, self.threads = stream, threads

    def __call__(self, x: torch.Tensor) -> object:
        torch.set_num_threads(self.threads)
        return self.stream(x)

    def finish(self) -> object:
        torch.set_num_threads(self.threads)
        return self.stream.finish()

    def fresh(self) -> _StreamAtThreads:
        return _StreamAtThreads(self.stream.fresh(), self.threads)
