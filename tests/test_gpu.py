"""The GPU path: CUDA graphs, the graphed full-ensemble baselines, and Lightning's predict
loop leaving the ensemble on its device.

The tests marked ``cuda`` run only where a GPU is (``benchmarks/gpu.py``'s machine); the
rest check, on any machine, what does not need one.
"""

from __future__ import annotations

import pytest
import torch

from conftest import small_members
from flexens.calibration.schema import PROFILE_FORMAT
from flexens.cuda_graphs import CudaGraphed, bucket_size, map_tensors
from flexens.ensemble import EnsembleOutput, FlexibleEnsembleModule
from flexens.halting import get_criterion
from flexens.inference import (
    FUSED_FULL,
    GRAPHED,
    InferSettings,
    fastest_full,
    measure_latency,
    predict_split,
)
from flexens.latency import latency_profile, profile_problems
from flexens.predict import predict_in_place, predict_trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
GPU, CPU = torch.device("cuda"), torch.device("cpu")


def test_batches_are_padded_to_the_next_power_of_two():
    assert [bucket_size(b) for b in (1, 2, 3, 4, 5, 128, 129, 256)] == [
        1, 2, 4, 4, 8, 128, 256, 256,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="at least one row, got 0"):
        bucket_size(0)


def test_a_graph_refuses_an_input_off_the_gpu():
    graphed = CudaGraphed(small_members(1)[0])
    with pytest.raises(ValueError, match="replay on a GPU; got an input on cpu"):
        graphed(torch.randn(1, 3, 8, 8))


def test_results_are_cut_to_the_real_rows_whatever_their_type():
    out = EnsembleOutput(torch.ones(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4))
    cut = map_tensors(lambda t: t[:2], out)
    assert cut.probs.shape == (2, 3) and cut.exit_stage.shape == (2,) and cut.target is None
    assert map_tensors(lambda t: t[:1], torch.ones(4)).shape == (1,)


def test_graphs_are_asked_for_only_where_a_gpu_runs_inference():
    nets = small_members(2)
    graphed = FlexibleEnsembleModule(nets, [0.3], cuda_graphs=True)
    x = torch.randn(5, 3, 8, 8)
    with torch.inference_mode():
        assert graphed.runners(x) == list(graphed.members)  # a CPU input: as they are
        out, eager = graphed(x), FlexibleEnsembleModule(nets, [0.3])(x)
    assert torch.equal(out.probs, eager.probs) and torch.equal(out.exit_stage, eager.exit_stage)
    with pytest.raises(ValueError, match="infer.cuda_graphs must be true or false, got 'yes'"):
        InferSettings(thresholds="t.json", cuda_graphs="yes")


def test_a_profile_measured_with_cuda_graphs_does_not_describe_eager_members():
    profile = {"format": PROFILE_FORMAT, "members": [], "cuda_graphs": True}
    assert "cuda_graphs was True, now False" in profile_problems(profile, CPU, 4, [3, 8, 8])


class MovesToTheCpu:
    """A Trainer whose predict loop ends as Lightning's GPU teardown does."""

    def predict(self, module, dataloaders):
        module.to(torch.float64)  # stands in for the teardown's move: the module changes
        return [module(x) for x in dataloaders]


def test_the_predict_loop_leaves_the_ensemble_where_it_found_it():
    module = FlexibleEnsembleModule(small_members(2), mode="full")
    moved = []
    original_to = module.to
    module.to = lambda *a, **k: moved.append(a) or original_to(*a, **k)
    predict_in_place(MovesToTheCpu(), module, [torch.randn(2, 3, 8, 8, dtype=torch.float64)])
    assert moved[-1] == (torch.device("cpu"),)  # put back on the device it was on


@cuda
def test_a_graph_replays_what_the_network_computes_at_every_bucket():
    net = small_members(1)[0].to(GPU)
    graphed = CudaGraphed(net, bucket=True)
    with torch.inference_mode():
        for batch in (1, 3, 4, 7, 1):
            x = torch.randn(batch, 3, 8, 8, device=GPU)
            torch.testing.assert_close(graphed(x), net(x))
    assert sorted(key[0] for key in graphed.graphs) == [1, 4, 8]
    graphed.cpu().to(GPU)  # a move drops the graphs captured with the old weights
    assert graphed.graphs == {}


@cuda
def test_flexible_execution_on_graphed_members_halts_as_on_eager_ones():
    nets = [n.to(GPU) for n in small_members(3)]
    eager = FlexibleEnsembleModule(nets, [0.2, 0.2])
    graphed = FlexibleEnsembleModule(nets, [0.2, 0.2], cuda_graphs=True)
    x = torch.randn(37, 3, 8, 8, device=GPU)
    graphed.prepare_graphs(x[:1], 37)  # every bucket up to 64, captured before use
    with torch.inference_mode():
        runners = graphed.runners(x)
        a, b = eager(x), graphed(x)
    assert all(sorted(k[0] for k in m.graphs) == [1, 2, 4, 8, 16, 32, 64] for m in runners)
    assert torch.equal(a.exit_stage, b.exit_stage)
    torch.testing.assert_close(a.probs, b.probs)
    graphed.cpu()  # the graphs hold the old weights' addresses: dropped
    assert graphed._graphed is None
    with torch.enable_grad():
        assert graphed.runners(x) == list(graphed.members)  # gradients on: eager


@cuda
def test_a_staged_stream_on_graphed_members_halts_as_batch_by_batch():
    nets = [n.to(GPU) for n in small_members(3)]
    graphed = FlexibleEnsembleModule(nets, [0.2, 0.2], cuda_graphs=True)
    x = torch.randn(40, 3, 8, 8, device=GPU)
    graphed.prepare_graphs(x[:1], 16)
    with torch.inference_mode():
        staged = graphed.staged(16).run(x.split(16))
        eager = FlexibleEnsembleModule(nets, [0.2, 0.2])(x)
        runners = graphed.runners(x)
    assert all(isinstance(m, CudaGraphed) for m in runners)
    assert torch.equal(staged.exit_stage, eager.exit_stage)
    torch.testing.assert_close(staged.probs, eager.probs)


@cuda
def test_a_gpu_profile_times_the_members_as_cuda_graphs():
    nets = [n.to(GPU) for n in small_members(2)]
    profile = latency_profile(
        nets, ["a", "b"], torch.randn(1, 3, 8, 8), 8, GPU, get_criterion("margin"), 10, 1.0
    )
    assert profile["cuda_graphs"] is True
    assert not any("cuda_graphs" in p for p in profile_problems(profile, GPU, 8, [3, 8, 8]))
    eager = {**profile, "cuda_graphs": False}  # measured by an older flexens
    assert "cuda_graphs was False, now True" in profile_problems(eager, GPU, 8, [3, 8, 8])


@cuda
def test_the_ensemble_stays_on_the_gpu_after_lightnings_predict_loop():
    module = FlexibleEnsembleModule([n.to(GPU) for n in small_members(2)], [0.3]).to(GPU)
    loader = torch.utils.data.DataLoader(torch.randn(8, 3, 8, 8), batch_size=4)
    predict_split(predict_trainer(GPU, progress_bar=False), module, loader)
    assert next(module.parameters()).device.type == "cuda"
    module(torch.randn(2, 3, 8, 8, device=GPU))  # what infer.py times next


@cuda
def test_the_graphed_full_ensembles_are_baselines_on_a_gpu():
    module = FlexibleEnsembleModule([n.to(GPU) for n in small_members(3)], [0.3, 0.3]).to(GPU)
    x = torch.randn(10, 3, 8, 8)
    timings = measure_latency(module, ["flexible", "full"], x[:4], x, 4, GPU, warmup=2, rounds=2)
    assert {"full" + GRAPHED, FUSED_FULL + GRAPHED} <= timings.keys()
    baseline = fastest_full(timings)
    assert baseline["latency_mean_ms"] == min(
        t["latency_mean_ms"] for n, t in timings.items() if n.startswith("full")
    )
