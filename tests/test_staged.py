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
    """A member that remembers the size of every batch it ran."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
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
