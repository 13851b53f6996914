"""Wall-clock profiling on the target device: warm-up, repeats, CUDA synchronisation.

The expected latency of a threshold set is ``Σ_k P(reach stage k) · t_k`` with ``t_k`` the
member's batch-1 latency plus the metareasoner's own per-stage cost (averaging and the
criterion). Profiles carry the device name, so a profile measured on one machine can be
loaded to calibrate for it on another.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexens.halting import Criterion, running_mean


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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({torch.get_num_threads()} threads)"


def machine_info(device: torch.device | None = None) -> dict:
    """Where figures come from: timings are only comparable on the same machine."""
    import datetime
    import os

    return {
        "device": device_name(device or torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> np.ndarray:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls, synchronised each time."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = np.empty(repeats)
        for i in range(repeats):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[i] = time.perf_counter() - start
    return times


def profile_member(
    network: nn.Module,
    example: torch.Tensor,
    batch_size: int,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 30,
) -> dict:
    """Median ms per image at batch size 1 and at the serving batch size."""
    network = network.to(device).eval()
    one = example[:1].to(device)
    batch = example[:1].expand(batch_size, *example.shape[1:]).contiguous().to(device)
    t1 = time_calls(lambda: network(one), device, warmup, repeats)
    tb = time_calls(lambda: network(batch), device, max(1, warmup // 2), max(3, repeats // 3))
    return {
        "batch1_ms": float(np.median(t1) * 1e3),
        "batch1_p90_ms": float(np.quantile(t1, 0.9) * 1e3),
        "batched_ms_per_image": float(np.median(tb) * 1e3 / batch_size),
    }


def profile_overhead(
    criterion: Criterion, num_classes: int, device: torch.device, repeats: int = 200
) -> float:
    """Median ms at batch 1 of one stage's bookkeeping: softmax, running mean, criterion."""
    logits = torch.randn(1, num_classes, device=device)
    prob_sum = torch.zeros(1, num_classes, device=device)

    def stage():
        probs = logits.softmax(dim=-1)
        conf = criterion(running_mean(prob_sum + probs, 2))
        return bool(conf > 0.5)  # the real loop syncs once per stage too

    return float(np.median(time_calls(stage, device, 20, repeats)) * 1e3)


def latency_profile(
    networks: Sequence[nn.Module],
    member_hashes: Sequence[str],
    example: torch.Tensor,
    batch_size: int,
    device: torch.device,
    criterion: Criterion,
    num_classes: int,
) -> dict:
    with torch.inference_mode():  # first calls pay for allocator and thread-pool start-up
        for net in networks:
            for _ in range(3):
                net.to(device).eval()(example[:1].to(device))
    members = [
        {"sha256": h, **profile_member(net, example, batch_size, device)}
        for net, h in zip(networks, member_hashes, strict=True)
    ]
    return {
        "device": device_name(device),
        "device_type": device.type,
        "batch_size": batch_size,
        "input_shape": list(example.shape[1:]),
        "members": members,
        "overhead_ms": profile_overhead(criterion, num_classes, device),
    }


def stage_costs_ms(profile: dict) -> np.ndarray:
    """Per-stage cost at batch 1: the member plus the halting bookkeeping."""
    return np.array([m["batch1_ms"] + profile["overhead_ms"] for m in profile["members"]])
