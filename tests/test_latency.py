"""The latency model: profiles, outliers, thread choice, staleness, fused continuation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flexens.calibration.loading import stored_profile
from flexens.calibration.schema import read_profile
from flexens.halting import get_criterion
from flexens.latency import (
    Budget,
    adaptive_interleaved,
    best_fuse_from,
    best_threads,
    curve_batch_sizes,
    expected_latency_ms,
    expected_throughput,
    latency_profile,
    measure_configurations,
    outliers,
    profile_problems,
    reach_fractions,
    stage_costs_ms,
    summarize,
)
from flexens.members.networks import SmallConvNet

CPU = torch.device("cpu")


@pytest.fixture
def profile(one_thread, tmp_path) -> dict:
    """A real profile of three tiny same-architecture members, within a small budget."""
    torch.manual_seed(0)
    nets = [SmallConvNet(10, 3, width=4, depth=2).eval() for _ in range(3)]
    example = torch.randn(1, 3, 8, 8)
    measured = latency_profile(
        nets, ["a", "b", "c"], example, 4, CPU, get_criterion("margin"), 10, seconds=1.0
    )
    return {**measured, "_nets": nets, "_example": example}


def public(profile: dict) -> dict:
    return {k: v for k, v in profile.items() if not k.startswith("_")}


def test_a_profile_records_how_it_was_measured(profile, tmp_path):
    assert profile["threads"] == {"batch1": 1, "batched": 1}
    assert profile["thread_candidates"] == [1] and profile["batch_size"] == 4
    assert profile["curve_batch_sizes"] == [1, 4]
    assert all(len(m["curve_ms_per_image"]) == 2 for m in profile["members"])
    assert profile["input_shape"] == [3, 8, 8] and profile["device_type"] == "cpu"
    assert len({m["arch"] for m in profile["members"]}) == 1
    assert len(profile["fused_batch1_ms"]) == 2  # members 0.. and 1.. fused
    assert profile["staged_overhead_ms"] > 0  # a staged stream's bookkeeping per call
    assert profile["retains_freed_memory"] is True  # glibc on Linux: flexens.allocator
    path = tmp_path / "latency_profile-cpu.json"
    path.write_text(json.dumps(public(profile)))
    assert read_profile(path)["threads"] == profile["threads"]
    # Only whether the twins agree depends on how busy the machine was.
    problems = profile_problems(profile, CPU, 4, [3, 8, 8])
    assert [p for p in problems if "twins" not in p] == []


def test_the_thread_count_with_the_cheapest_ensemble_is_chosen_per_batch_size():
    by_threads = {
        "1": {"batch1_ms": [1.0, 1.1], "batched_ms_per_image": [0.5, 0.5]},
        "2": {"batch1_ms": [1.6, 1.5], "batched_ms_per_image": [0.3, 0.3]},
    }
    assert best_threads(by_threads, "batch1_ms") == "1"
    assert best_threads(by_threads, "batched_ms_per_image") == "2"


def test_an_injected_outlier_is_detected(profile):
    assert outliers([0.25, 0.26, 1.73, 0.24, 0.25], ["x"] * 5, 0.25) == [2]
    assert outliers([0.25, 1.73], ["x", "y"], 0.25) == []  # different architectures
    # Twins timed alike (a shared CI machine may not time them alike), then one made slow.
    twin = {"batch1_ms": 0.05, "batched_ms_per_image": 0.02}
    noisy = {**profile, "members": [{**m, **twin} for m in profile["members"]]}
    noisy["members"][1]["batched_ms_per_image"] *= 7
    (problem,) = profile_problems(noisy, CPU, 4, [3, 8, 8])
    assert "member 1's batched_ms_per_image disagrees" in problem


def test_a_profile_for_other_conditions_is_stale(profile):
    assert any("batch_size" in p for p in profile_problems(profile, CPU, 256, [3, 8, 8]))
    assert any("input_shape" in p for p in profile_problems(profile, CPU, 4, [3, 32, 32]))
    old = {k: v for k, v in profile.items() if k != "format"}
    assert "format None" in profile_problems(old, CPU, 4, [3, 8, 8])[0]
    unfolded = {**profile, "network_form": "unfolded"}  # members timed in another form
    assert any("network_form" in p for p in profile_problems(unfolded, CPU, 4, [3, 8, 8]))
    other = {**profile, "curve_batch_sizes": [1, 3, 4]}  # not the points flexens records
    assert any("curve_batch_sizes" in p for p in profile_problems(other, CPU, 4, [3, 8, 8]))
    older = {k: v for k, v in profile.items() if k != "staged_overhead_ms"}
    assert any("staged_overhead_ms" in p for p in profile_problems(older, CPU, 4, [3, 8, 8]))
    faulting = {k: v for k, v in profile.items() if k != "retains_freed_memory"}
    assert any("retains_freed_memory" in p for p in profile_problems(faulting, CPU, 4, [3, 8, 8]))


def test_the_curve_is_dense_where_halting_leaves_small_sub_batches():
    assert curve_batch_sizes(256) == [2, 4, 8, 16, 32, 64]
    assert curve_batch_sizes(100) == [2, 4, 6, 8, 16, 25]  # B/16 and B/4 themselves
    assert curve_batch_sizes(4) == []


def test_an_old_stored_profile_is_measured_again_with_a_note(profile, tmp_path, capsys):
    path = tmp_path / "latency_profile-cpu.json"
    old = {k: v for k, v in public(profile).items() if k not in ("format", "threads")}
    path.write_text(json.dumps(old))
    members = [
        SimpleNamespace(sha256=h, network=n) for h, n in zip("abc", profile["_nets"], strict=True)
    ]
    assert stored_profile(path, members, CPU, profile["_example"], 4, check=False) is None
    assert "written by an older flexens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="has format None"):  # a given one: a one-line error
        stored_profile(path, members, CPU, profile["_example"], 4, check=None)


def test_throughput_prices_each_stage_at_the_size_of_its_sub_batch():
    member = {"batch1_ms": 2.0, "batched_ms_per_image": 0.5, "curve_ms_per_image": [2.0, 0.4, 0.5]}
    profile = {"batch_size": 256, "curve_batch_sizes": [1, 64, 256], "members": [member] * 2}
    # all 256 samples run member 1 (0.5 ms each), 64 of them member 2 (0.4 ms each)
    assert expected_throughput(profile, np.array([1.0, 0.25])) == pytest.approx(
        1e3 * 256 / (256 * 0.5 + 64 * 0.4)
    )
    # between recorded sizes a call's time runs straight: fixed part plus a part per sample
    at_128 = 1e3 * 256 / (256 * 0.5 + (64 * 0.4 + (256 * 0.5 - 64 * 0.4) * 64 / 192))
    assert expected_throughput(profile, np.array([1.0, 0.5])) == pytest.approx(at_128)
    # half a sample on average: half a batch-1 call
    assert expected_throughput(profile, np.array([1.0, 0.5 / 256])) == pytest.approx(
        1e3 * 256 / (256 * 0.5 + 0.5 * 2.0)
    )
    # every stage that runs pays the halting loop's bookkeeping once per batch
    booked = {**profile, "overhead_ms": 3.0}
    assert expected_throughput(booked, np.array([1.0, 0.25])) == pytest.approx(
        1e3 * 256 / (256 * 0.5 + 64 * 0.4 + 2 * 3.0)
    )
    # a profile from before the curve prices every sample at the serving batch's cost
    flat = {"members": [{"batched_ms_per_image": 0.5}] * 2, "batch_size": 256}
    assert expected_throughput(flat, np.array([1.0, 0.25])) == pytest.approx(1e3 / 0.625)


def test_fused_continuation_prices_every_exit_as_it_runs():
    profile = {
        "overhead_ms": 0.0,
        "members": [{"batch1_ms": 1.0} for _ in range(4)],
        "fused_batch1_ms": [1.5, 1.4, 1.3],
    }
    assert stage_costs_ms(profile, fuse_from=2).tolist() == [1.0, 1.0, 1.3, 0.0]
    reach = reach_fractions(np.array([0, 0, 1, 3]), 4)
    assert reach.tolist() == [1.0, 0.5, 0.25, 0.25]
    assert expected_latency_ms(profile, reach) == pytest.approx(2.0)
    assert expected_latency_ms(profile, reach, 1) == pytest.approx(1.0 + 0.5 * 1.4)
    assert best_fuse_from(profile, reach) == 1
    slow = {**profile, "fused_batch1_ms": [9.0, 9.0, 9.0]}
    assert best_fuse_from(slow, reach) is None


def test_adaptive_timing_stops_within_its_budget_and_summarises(one_thread):
    calls = {"a": 0}
    fns = {"a": lambda: calls.__setitem__("a", calls["a"] + 1), "b": lambda: None}
    times = adaptive_interleaved(fns, CPU, Budget(seconds=0.2, max_rounds=50))
    assert 2 <= len(times["a"]) == len(times["b"]) <= 50 and calls["a"] == len(times["a"]) + 1
    figures = summarize(np.array([0.001, 0.002, 0.003, 0.010]))
    assert figures["latency_mean_ms"] == pytest.approx(4.0)
    assert figures["latency_p50_ms"] == pytest.approx(2.5)
    assert figures["throughput_img_s"] == pytest.approx(4 / 0.016)


def test_configurations_are_reported_with_the_thread_count_they_ran_at(one_thread):
    x = torch.randn(6, 3, 4, 4)
    fns = {"double": lambda t: t * 2, "sum": lambda t: t.sum()}
    results = measure_configurations(
        fns,
        x[:4],
        x,
        3,
        CPU,
        rounds=2,
        warmup=1,
        threads={"batch1": 1, "batched": 1},
        explore=["double"],
    )
    for figures in results.values():
        assert figures["threads_batch1"] == figures["threads_batched"] == 1
        assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
        assert figures["latency_mean_ms"] > 0 and figures["throughput_img_s"] > 0


class CountingStream:
    """A :class:`flexens.latency.Stream` that counts what it was given and finished."""

    def __init__(self, log: list) -> None:
        self.log, self.pushed = log, 0

    def __call__(self, x: torch.Tensor) -> None:
        self.pushed += len(x)

    def finish(self) -> None:
        self.log.append(self.pushed)
        self.pushed = 0

    def fresh(self) -> CountingStream:
        return CountingStream(self.log)


def test_a_stream_is_timed_for_throughput_only_with_its_finish(one_thread):
    """Warm-up work is finished before the timed rounds, the timed pass is finished once,
    and a stream never runs at batch 1."""
    x, finished = torch.randn(7, 3, 4, 4), []
    results = measure_configurations(
        {"plain": lambda t: t * 2, "stream": CountingStream(finished)},
        x[:4],
        x,
        3,
        CPU,
        rounds=2,
        warmup=1,
        threads={"batch1": 1, "batched": 1},
        explore=[],
    )
    assert finished == [3, 7]  # the warm-up batch, then the whole stream
    assert "latency_mean_ms" not in results["stream"] and "threads_batch1" not in results["stream"]
    assert results["stream"]["throughput_img_s"] > 0 and results["stream"]["threads_batched"] == 1
    assert results["plain"]["latency_mean_ms"] > 0


def test_a_staged_stream_is_priced_at_full_batches():
    """Staged, member k costs P(reach k) full batches per B images; batch by batch, one
    call on the P(reach k)·B samples that reach it, dearer per image on this curve."""
    member = {
        "batch1_ms": 1.0,
        "batched_ms_per_image": 0.25,
        "curve_ms_per_image": [1.0, 0.5, 0.25],
    }
    profile = {
        "batch_size": 16,
        "curve_batch_sizes": [1, 4, 16],
        "overhead_ms": 0.0,
        "members": [member, member],
    }
    reach = np.array([1.0, 0.25])
    assert expected_throughput(profile, reach) == pytest.approx(1e3 * 16 / (4.0 + 2.0))
    # a stream of 64: member 1 runs 4 full batches, member 2 one full and nothing left:
    # 5 full batches' cost per 16 images
    assert expected_throughput(profile, reach, staged_images=64) == pytest.approx(
        1e3 * 64 / (4 * 4.0 + 4.0)
    )
    assert expected_throughput(profile, reach, staged_images=64) == pytest.approx(1e3 * 16 / 5.0)
    # a stream of 24: member 1 one full batch and a call of 8, member 2 a call of 6
    at_6, at_8 = 2.0 + (6 - 4) / 12 * 2.0, 2.0 + (8 - 4) / 12 * 2.0
    assert expected_throughput(profile, reach, staged_images=24) == pytest.approx(
        1e3 * 24 / (4.0 + at_8 + at_6)
    )
    # the stream's own bookkeeping per call where the profile measured it, else the loop's
    booked = {**profile, "overhead_ms": 0.5, "staged_overhead_ms": 1.0}
    assert expected_throughput(booked, reach, staged_images=64) == pytest.approx(
        1e3 * 64 / (5 * (4.0 + 1.0))
    )
    del booked["staged_overhead_ms"]
    assert expected_throughput(booked, reach, staged_images=64) == pytest.approx(
        1e3 * 64 / (5 * (4.0 + 0.5))
    )


BAD_PROFILES = {
    "not-json": (lambda p: "[1, 2", "is not readable JSON"),
    "old-format": (lambda p: {**p, "format": None}, "has format None"),
    "no-network-form": (lambda p: {**p, "network_form": None}, "network_form"),
    "nan-cost": (
        lambda p: {**p, "members": [{**p["members"][0], "batch1_ms": float("nan")}]},
        "must hold finite numbers",
    ),
    "zero-cost": (
        lambda p: {**p, "members": [{**p["members"][0], "batched_ms_per_image": 0.0}]},
        "has a cost <= 0",
    ),
    "text-staged-overhead": (
        lambda p: {**p, "staged_overhead_ms": "fast"},
        "field 'staged_overhead_ms' must hold finite numbers",
    ),
    "member-without-hash": (lambda p: {**p, "members": [{"batch1_ms": 1.0}]}, "is malformed"),
    "short-curve": (
        lambda p: {**p, "members": [{**p["members"][0], "curve_ms_per_image": [1.0]}]},
        "must list one cost per curve_batch_sizes entry",
    ),
    "unsorted-curve-sizes": (
        lambda p: {**p, "curve_batch_sizes": [4, 1]},
        "curve_batch_sizes must be increasing",
    ),
}


@pytest.mark.parametrize("damage", BAD_PROFILES, ids=list(BAD_PROFILES))
def test_every_bad_profile_file_is_one_line_naming_it(profile, tmp_path, damage):
    edit, match = BAD_PROFILES[damage]
    bad = edit(public(profile))
    path = tmp_path / "latency_profile-cpu.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError) as info:
        read_profile(path)
    message = str(info.value)
    assert match in message and str(path) in message and "\n" not in message, message
    assert "delete it to measure again" in message


def test_a_gap_warning_blames_the_model_only_for_a_gap_full_does_not_share():
    from flexens.inference import gap_warnings

    machine = "(a busy machine, or a stale profile: calibrate.reprofile=true)"
    results = {
        "full": {"latency_gap": 0.05, "throughput_gap": -0.30},
        "flexible": {"latency_gap": 0.02, "throughput_gap": -0.25},  # as full: the machine
        "flexible_staged": {"throughput_gap": -0.50},  # -29 % against full: the model
    }
    assert gap_warnings(results, ["full", "flexible", "flexible_staged"]) == [
        f"warning: full's measured throughput is -30% off the latency profile's prediction "
        f"{machine}",
        f"warning: flexible's measured throughput is -25% off the latency profile's "
        f"prediction {machine}",
        "warning: flexible_staged's measured throughput is -50% off the latency profile's "
        "prediction (-29% against full, timed in the same rounds: the latency model "
        "misprices flexible_staged here)",
    ]
    assert gap_warnings({"flexible": {"throughput_gap": -0.2}}, ["flexible"]) == [
        f"warning: flexible's measured throughput is -20% off the latency profile's "
        f"prediction {machine}"  # nothing to compare with
    ]
