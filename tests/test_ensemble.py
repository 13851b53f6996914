import numpy as np
import pytest
import pytorch_lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexens.calibration.search import simulate_exits
from flexens.calibration.simulate import StageTable
from flexens.ensemble import EnsembleOutput, FlexibleEnsembleModule
from flexens.halting import get_criterion


def make_members(
    n: int = 4, features: int = 16, classes: int = 5, seed: int = 0
) -> list[nn.Module]:
    torch.manual_seed(seed)
    members = []
    for _ in range(n):
        layer = nn.Linear(features, classes)
        nn.init.normal_(layer.weight, std=0.8)
        members.append(nn.Sequential(nn.Flatten(), layer).eval())
    return members


def inputs(samples: int = 200, features: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(samples, features, generator=torch.Generator().manual_seed(seed))


def averaged(members, x, k=None):
    with torch.no_grad():
        probs = [m(x).softmax(-1) for m in members[:k]]
    return sum(probs[1:], probs[0]) / len(probs)


def test_thresholds_that_never_halt_equal_the_plain_averaged_ensemble_exactly():
    members, x = make_members(), inputs()
    module = FlexibleEnsembleModule(members, [1.0, 1.0, 1.0])
    with torch.no_grad():
        out = module.predict_step((x, torch.zeros(len(x))), 0)
    assert torch.equal(out.probs, averaged(members, x))
    assert (out.exit_stage == 3).all()


@pytest.mark.parametrize("seed", range(5))
def test_batched_halting_equals_one_sample_at_a_time(seed):
    members, x = make_members(seed=seed), inputs(seed=seed)
    thresholds = np.random.default_rng(seed).uniform(0, 0.6, size=3).round(2).tolist()
    module = FlexibleEnsembleModule(members, thresholds)
    with torch.no_grad():
        batched = module(x)
        singles = [module(x[i : i + 1]) for i in range(len(x))]
    for key in ("prediction", "exit_stage"):
        assert torch.equal(getattr(batched, key), torch.cat([getattr(s, key) for s in singles]))
    assert torch.allclose(batched.probs, torch.cat([s.probs for s in singles]), atol=1e-6)
    assert 0 < batched.exit_stage.float().mean() < 3  # some halt early, some do not


def test_full_and_first_k_modes():
    members, x = make_members(), inputs()
    module = FlexibleEnsembleModule(members, [0.0, 0.0, 0.0], mode="full")
    with torch.no_grad():
        assert torch.equal(module(x).probs, averaged(members, x))
        for k in (1, 2, 3):
            module.set_mode("first_k", k)
            out = module(x)
            assert torch.equal(out.probs, averaged(members, x, k))
            assert (out.exit_stage == k - 1).all()
    with pytest.raises(ValueError, match="first_k must be in 1..4"):
        module.set_mode("first_k", 5)
    with pytest.raises(ValueError, match="unknown mode"):
        module.set_mode("fastest")


def test_simulation_and_predict_step_agree_sample_by_sample():
    """Calibration's simulated exits and predictions == FlexibleEnsembleModule's real ones ==
    the staged stream's (:mod:`flexens.staged`)."""
    members, x = make_members(n=5), inputs(samples=500)
    labels = torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.stack([m(x).float().softmax(-1) for m in members])
    for criterion in ("margin", "max_prob", "entropy"):
        table = StageTable.from_probs(probs, labels, get_criterion(criterion), np.ones(5))
        thresholds = np.quantile(table.confidence[:-1], 0.5, axis=1).round(2)
        module = FlexibleEnsembleModule(members, thresholds.tolist(), criterion=criterion)
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        out = trainer.predict(module, DataLoader(TensorDataset(x, labels), batch_size=64))
        exits = torch.cat([o.exit_stage for o in out]).numpy()
        predictions = torch.cat([o.prediction for o in out]).numpy()
        simulated = table.exits(thresholds)
        assert np.array_equal(exits, simulated)
        assert np.array_equal(exits, simulate_exits(table, thresholds))  # the search's fast path
        assert np.array_equal(predictions, table.predictions[simulated, np.arange(len(x))])
        assert 1.2 < exits.mean() + 1 < 4.8
        with torch.inference_mode():
            staged = module.staged(64).run(x.split(64))
            one_by_one = EnsembleOutput.cat([module(x[i : i + 1]) for i in range(100)])
        assert np.array_equal(staged.exit_stage.numpy(), simulated)
        assert np.array_equal(staged.prediction.numpy(), predictions)
        assert np.array_equal(one_by_one.exit_stage.numpy(), simulated[:100])  # batch-1 path
        assert np.array_equal(one_by_one.prediction.numpy(), predictions[:100])


def test_oracle_mode_matches_the_simulated_oracle():
    members, x = make_members(), inputs()
    labels = torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():
        probs = torch.stack([m(x).softmax(-1) for m in members])
        out = FlexibleEnsembleModule(members, mode="oracle")(x)
    table = StageTable.from_probs(probs, labels, get_criterion("margin"), np.ones(4))
    assert out.exit_stage.float().add(1).mean().item() == pytest.approx(table.oracle().avg_members)
    assert torch.equal(out.prediction, averaged(members, x).argmax(1))
