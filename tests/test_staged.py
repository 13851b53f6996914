"""A staged stream answers as batch-by-batch flexible execution does, with full member calls."""

from __future__ import annotations

import pytest
import torch

from conftest import small_members as networks
from flexens.ensemble import FlexibleEnsembleModule, run_full
from flexens.execution import EnsembleOutput
from flexens.staged import StagedStream


def spread_thresholds(nets, x) -> list[float]:
    """Thresholds that halt some samples at every stage (each stage's 60 % quantile)."""
    module = FlexibleEnsembleModule(nets, [0.0] * (len(nets) - 1))
    with torch.inference_mode():
        conf = [module.criterion(run_full(nets[: k + 1], x)) for k in range(len(nets) - 1)]
    return [float(c.quantile(0.6)) for c in conf]


class Recorded(torch.nn.Module):
    """A member that remembers the size of every batch it ran, and whether it came
    channels_last."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.sizes, self.channels_last = net, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.net(x)


@pytest.mark.parametrize("chunk", [16, 5, 40])
def test_staged_stream_answers_as_batch_by_batch_flexible(one_thread, chunk):
    """Same exit stage and prediction for every sample, in the order pushed, whatever the
    size of the pushed batches against the stream's batch of 16."""
    nets, x = networks(), torch.randn(150, 3, 12, 12)
    module = FlexibleEnsembleModule(nets, spread_thresholds(nets, x))
    with torch.inference_mode():
        batch_by_batch = EnsembleOutput.cat([module(b) for b in x.split(16)])
        staged = module.staged(16).run(x.split(chunk))
    assert set(batch_by_batch.exit_stage.tolist()) == {0, 1, 2, 3}
    assert torch.equal(staged.exit_stage, batch_by_batch.exit_stage)
    assert torch.equal(staged.prediction, batch_by_batch.prediction)
    torch.testing.assert_close(staged.probs, batch_by_batch.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(staged.confidence, batch_by_batch.confidence, rtol=1e-5, atol=1e-6)


def test_every_member_call_is_a_full_batch_until_the_stream_ends(one_thread):
    nets, x = networks(), torch.randn(160, 3, 12, 12)
    thresholds = spread_thresholds(nets, x)
    recorded = [Recorded(n) for n in nets]
    stream = FlexibleEnsembleModule(recorded, thresholds).staged(16)
    with torch.inference_mode():
        for b in x.split(16):
            stream.push(b)
        during = [list(r.sizes) for r in recorded]
        out = stream.finish()
    assert all(size == 16 for sizes in during for size in sizes)
    assert during[0] == [16] * 10  # the first member ran every batch as it came
    reached = [(out.exit_stage >= k).sum().item() for k in range(len(nets))]
    assert [sum(r.sizes) for r in recorded] == reached  # each sample ran each member once
    assert all(sum(r.sizes) - sum(d) < 16 for r, d in zip(recorded, during, strict=True))


def test_a_channels_last_stream_stays_channels_last_at_every_stage(one_thread):
    """``infer.channels_last=true``: the samples a stage passes on reach the next member in
    the layout the module gave the batch, as batch by batch, so both compute alike."""
    nets, x = networks(), torch.randn(96, 3, 12, 12)
    recorded = [Recorded(n) for n in nets]
    module = FlexibleEnsembleModule(recorded, spread_thresholds(nets, x), channels_last=True)
    with torch.inference_mode():
        staged = module.staged(16).run(x.split(16))
        batch_by_batch = EnsembleOutput.cat([module(b) for b in x.split(16)])
    assert all(all(r.channels_last) and len(r.channels_last) > 1 for r in recorded)
    assert torch.equal(staged.exit_stage, batch_by_batch.exit_stage)


def test_a_finished_stream_starts_empty_and_fresh_streams_are_independent(one_thread):
    nets, x = networks(3), torch.randn(40, 3, 12, 12)
    stream = FlexibleEnsembleModule(nets, [0.5, 0.5]).staged(8)
    with torch.inference_mode():
        first = stream.run(x.split(8))
        twin = stream.fresh()
        twin.push(x[:8])
        second = stream.run([x])
        assert len(twin.finish().exit_stage) == 8
    assert len(first.exit_stage) == len(second.exit_stage) == 40
    assert torch.equal(first.exit_stage, second.exit_stage)
    with pytest.raises(ValueError, match="nothing was pushed"):
        stream.finish()


def test_a_staged_stream_needs_a_batch_size():
    with pytest.raises(ValueError, match="batch size >= 1, got 0"):
        StagedStream([lambda x: x], [], lambda p: p.amax(-1), 0)


class _Images:
    """The part of a datamodule that ``predict_images`` uses."""

    @staticmethod
    def image_transform():
        from torchvision.transforms import v2

        return v2.Compose(
            [v2.ToImage(), v2.Resize(12), v2.CenterCrop(12), v2.ToDtype(torch.float32, scale=True)]
        )


@pytest.mark.parametrize("mode", ["flexible", "full"])
def test_a_folder_is_predicted_as_the_module_answers_it_whole(one_thread, tmp_path, mode):
    """``infer.py input=<folder>``: decoded a batch at a time and, in flexible mode, run as
    a staged stream; every row is what the module answers on the whole folder at once."""
    import csv
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from flexens.images import image_batches
    from flexens.inference import predict_images

    rng = np.random.default_rng(0)
    for i in range(23):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"{i:02}.png"
        )
    (tmp_path / "broken.png").write_text("not an image")
    nets = networks()
    [loaded] = image_batches(tmp_path, 3, _Images.image_transform(), batch_size=100)
    recorded = [Recorded(n) for n in nets]
    module = FlexibleEnsembleModule(recorded, spread_thresholds(nets, loaded.tensors), mode=mode)
    with torch.inference_mode():
        whole = module(loaded.tensors)
    for r in recorded:
        r.sizes.clear()
    member = SimpleNamespace(
        arch={"in_chans": 3}, meta={"class_names": [str(c) for c in range(10)]}
    )
    out = tmp_path / "predictions.csv"
    result = predict_images(tmp_path, 4, module, _Images(), [member], out)
    assert result["predicted"] == 23 and result["skipped"] == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [str(p) for p in loaded.paths]
    assert [int(r["members_used"]) for r in rows] == (whole.exit_stage + 1).tolist()
    assert [r["class_name"] for r in rows] == [str(p) for p in whole.prediction.tolist()]
    sizes = [r.sizes for r in recorded]
    if mode == "flexible":  # staged: every member call but its last one is a full batch
        assert len(set(whole.exit_stage.tolist())) == len(nets)
        assert all(size == 4 for calls in sizes for size in calls[:-1])
    else:
        assert sizes == [[4] * 5 + [3]] * len(nets)


def test_the_stream_runs_the_members_the_module_picks_for_each_call(one_thread):
    """A staged stream calls ``runners(x)`` as the module's own forward does (CUDA graphs on a
    GPU with ``cuda_graphs``), not the raw members."""
    nets, x = networks(), torch.randn(40, 3, 12, 12)
    recorded = [Recorded(n) for n in nets]
    module = FlexibleEnsembleModule(nets, spread_thresholds(nets, x))
    module.runners = lambda batch: recorded
    with torch.inference_mode():
        staged = module.staged(8).run(x.split(8))
        expected = FlexibleEnsembleModule(nets, module.thresholds)(x)
    assert torch.equal(staged.exit_stage, expected.exit_stage)
    reached = [int((expected.exit_stage >= k).sum()) for k in range(4)]
    assert [sum(r.sizes) for r in recorded] == reached


def test_infer_table_shows_a_staged_row_and_the_oracle_with_dashes(capsys):
    """``infer.py``'s table: one format for every row; what a mode was not timed for is -."""
    from flexens.inference import print_table

    timed = {
        "latency_mean_ms": 0.5, "latency_p50_ms": 0.4, "latency_p90_ms": 0.6,
        "latency_p99_ms": 1.0, "throughput_img_s": 9000.0, "threads_batch1": 1,
        "threads_batched": 2, "expected_latency_ms": 0.45, "speedup_latency": 2.99,
        "speedup_throughput": 1.5,
    }  # fmt: skip
    staged = {"throughput_img_s": 12000.0, "threads_batched": 2, "speedup_throughput": 2.03}
    rows = {"flexible": timed, "flexible_staged": staged, "oracle": {}}
    print_table({m: {"accuracy": 0.98, "avg_members": 1.05, **r} for m, r in rows.items()})
    header, *lines = capsys.readouterr().out.splitlines()
    flexible, staged_line, oracle = (line.split() for line in lines)
    assert header.split()[:3] == ["mode", "accuracy", "members"]
    assert len(flexible) == len(staged_line) == len(oracle) == 11
    assert flexible[-1] == "2.99×/1.50×" and flexible[-3] == "1/2"
    assert staged_line[3:7] == ["-"] * 4 and staged_line[-1] == "-/2.03×"
    assert oracle[3:] == ["-"] * 5 + ["-/-", "-", "-/-"]
