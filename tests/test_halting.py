import math

import pytest
import torch

from flexens.halting import (
    criterion_names,
    exit_stages,
    get_criterion,
    should_halt,
    stage_outputs,
    validate_thresholds,
)


def test_criteria_on_hand_made_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(get_criterion("margin")(probs), torch.tensor([0.5, 0.0, 0.0]))
    assert torch.allclose(get_criterion("max_prob")(probs), torch.tensor([0.7, 0.4, 1 / 3]))
    entropy = get_criterion("entropy")(probs)
    h0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert entropy[0].item() == pytest.approx(1 - h0 / math.log(3), abs=1e-6)
    assert entropy[2].item() == pytest.approx(0.0, abs=1e-6)
    assert get_criterion("entropy")(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(1.0)
    assert set(criterion_names()) >= {"margin", "max_prob", "entropy"}


def test_unknown_criterion_names_the_choices():
    with pytest.raises(ValueError, match="'nope'.*margin"):
        get_criterion("nope")


def test_halting_is_strictly_above_threshold_and_last_always_answers():
    conf = torch.tensor([0.3, 0.5, 0.7])
    assert should_halt(conf, 0.5, is_last=False).tolist() == [False, False, True]
    assert should_halt(conf, 0.9, is_last=True).tolist() == [True, True, True]


def test_stage_outputs_and_exits_with_known_answers():
    # two members, two samples, two classes
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.55, 0.45]],  # member 1
            [[0.7, 0.3], [0.05, 0.95]],  # member 2
        ]
    )
    conf, pred = stage_outputs(probs, get_criterion("margin"))
    assert torch.allclose(conf, torch.tensor([[0.8, 0.1], [0.6, 0.4]]))
    assert pred.tolist() == [[0, 0], [0, 1]]
    assert exit_stages(conf, torch.tensor([0.5])).tolist() == [0, 1]
    assert exit_stages(conf, torch.tensor([0.05])).tolist() == [0, 0]
    assert exit_stages(conf, torch.tensor([1.0])).tolist() == [1, 1]


def test_threshold_count_must_match_members():
    with pytest.raises(ValueError, match="needs N-1 = 2"):
        validate_thresholds([0.5], num_members=3)
    with pytest.raises(ValueError, match="finite"):
        validate_thresholds([float("nan")], num_members=2)
