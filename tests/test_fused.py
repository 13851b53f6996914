"""Fused members (``vmap``) compute what the sequential loop computes."""

from __future__ import annotations

import pytest
import torch

from conftest import small_members as networks
from flexens.ensemble import FlexibleEnsembleModule, run_full
from flexens.fused import FusedMembers, can_fuse
from flexens.members.networks import SmallConvNet


def test_fused_full_ensemble_matches_the_sequential_loop(one_thread):
    nets, x = networks(), torch.randn(16, 3, 12, 12)
    with torch.inference_mode():
        fused, sequential = FusedMembers(nets).full(x), run_full(nets, x)
    torch.testing.assert_close(fused, sequential, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.argmax(1), sequential.argmax(1))


def test_only_one_architecture_fuses():
    wide = SmallConvNet(num_classes=10, in_chans=3, width=8, depth=2)
    assert can_fuse(networks(2)) and not can_fuse(networks(1))
    assert not can_fuse([*networks(2), wide])
    with pytest.raises(ValueError, match="one architecture"):
        FusedMembers([*networks(2), wide])


@pytest.mark.parametrize("fuse_from", [1, 2])
def test_fused_continuation_gives_the_sequential_answers(one_thread, fuse_from):
    """Same predictions, exit stages and confidences, at thresholds that halt some samples
    at every stage (the quantiles of each stage's confidence)."""
    nets, x = networks(), torch.randn(64, 3, 12, 12)
    sequential = FlexibleEnsembleModule(nets, [0.0, 0.0, 0.0])
    with torch.inference_mode():
        conf = torch.stack([sequential.criterion(run_full(nets[: k + 1], x)) for k in range(3)])
    thresholds = [float(conf[k].quantile(0.6)) for k in range(3)]
    sequential.set_thresholds(thresholds)
    fused = FlexibleEnsembleModule(nets, thresholds, fuse_from=fuse_from)
    with torch.inference_mode():
        a, b = sequential(x), fused(x)
    assert len(set(a.exit_stage.tolist())) == 4  # every stage answers for someone
    assert torch.equal(a.exit_stage, b.exit_stage)
    assert torch.equal(a.prediction, b.prediction)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-5, atol=1e-6)


def test_fused_continuation_checks_where_it_starts():
    with pytest.raises(ValueError, match="fuse_from must be in 1..2"):
        FlexibleEnsembleModule(networks(), fuse_from=3)


def test_infer_fuse_from_auto_follows_the_calibration_for_its_own_thresholds():
    from types import SimpleNamespace

    from flexens.inference import InferSettings, OperatingPoint, resolve_fuse_from

    calibration = SimpleNamespace(thresholds=(0.3, 0.4, 0.5), fuse_from=2)
    calibrated = OperatingPoint([0.3, 0.4, 0.5], "calibrated", 1.0, {})
    other = OperatingPoint([0.1, 0.1, 0.1], "max_drop=0.05", 0.8, {})
    auto = InferSettings(thresholds="t.json")
    assert auto.fuse_from == "auto"
    assert resolve_fuse_from(auto, calibration, calibrated) == 2
    assert resolve_fuse_from(auto, calibration, other) is None  # nobody priced fusing there
    full = InferSettings(thresholds="t.json", mode="full")
    assert resolve_fuse_from(full, calibration, calibrated) is None
    forced = InferSettings(thresholds="t.json", fuse_from=1)
    assert resolve_fuse_from(forced, calibration, other) == 1
    off = InferSettings(thresholds="t.json", fuse_from=None)
    assert resolve_fuse_from(off, calibration, calibrated) is None
    for bad in (0, "sometimes", True):
        with pytest.raises(ValueError, match="infer.fuse_from must be auto, null or a stage"):
            InferSettings(thresholds="t.json", fuse_from=bad)
