from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexens.calibration.cache import members_logits
from flexens.members.registry import Member


class Counting(nn.Module):
    """A linear member that counts its forward passes."""

    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.calls, self.poison = 0, poison

    def forward(self, x):
        self.calls += 1
        out = self.layer(x)
        if self.poison:
            out[:2] = float("nan")
        return out


def member(sha: str, poison: bool = False) -> Member:
    return Member(0, Path(f"seed={sha}.safetensors"), sha, {}, {}, Counting(poison))


class CountingReads(TensorDataset):
    """Ten samples that count how often they are read."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        super().__init__(torch.randn(10, 4, generator=g), torch.arange(10) % 3)
        self.reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def loader(data: CountingReads | None = None) -> DataLoader:
    return DataLoader(data or CountingReads(), batch_size=4)


def member_logits(m: Member, data: DataLoader, *key) -> tuple[torch.Tensor, torch.Tensor]:
    return members_logits([m], data, *key)[0]


def test_logits_are_computed_once_then_served_from_cache(tmp_path):
    m = member("a" * 64)
    first, labels = member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    calls = m.network.calls
    again, labels_again = member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    assert (
        m.network.calls == calls and torch.equal(first, again) and torch.equal(labels, labels_again)
    )
    member_logits(m, loader(), torch.device("cpu"), tmp_path, "other split", "t")
    assert m.network.calls > calls  # another split is another key


def test_outputs_of_another_inference_form_are_not_reused(tmp_path, monkeypatch):
    m = member("e" * 64)
    member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    calls = m.network.calls
    monkeypatch.setattr("flexens.calibration.cache.INFERENCE_FORM", "another-form/2")
    member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    assert m.network.calls > calls


def test_a_foreign_or_damaged_cache_entry_is_rebuilt(tmp_path):
    m = member("b" * 64)
    member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    (entry,) = (tmp_path / "logits").glob("*.pt")
    payload = torch.load(entry)
    payload["key"]["member_sha256"] = "c" * 64  # as if written for other checkpoints
    torch.save(payload, entry)
    calls = m.network.calls
    member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    assert m.network.calls > calls
    entry.write_bytes(b"truncated")
    calls = m.network.calls
    member_logits(m, loader(), torch.device("cpu"), tmp_path, "split", "t")
    assert m.network.calls > calls


def test_nan_outputs_name_the_member_and_count(tmp_path):
    with pytest.raises(
        ValueError, match=r"seed=d+\.safetensors produced NaN/Inf outputs for 6 of 10"
    ):
        member_logits(
            member("d" * 64, poison=True), loader(), torch.device("cpu"), tmp_path, "s", "t"
        )
    assert not list(tmp_path.glob("logits/*.pt"))


def test_members_without_outputs_run_together_in_one_pass(tmp_path):
    """Each sample is read once however many members need it; a cached member does not run."""
    cached, a, b = member("f" * 64), member("0" * 64), member("1" * 64)
    alone, _ = member_logits(cached, loader(), torch.device("cpu"), tmp_path, "split", "t")
    calls = cached.network.calls
    data = CountingReads()
    outputs = members_logits(
        [cached, a, b], loader(data), torch.device("cpu"), tmp_path, "split", "t"
    )
    assert data.reads == 10 and cached.network.calls == calls
    assert a.network.calls == b.network.calls == 3  # batches of 4, 4 and 2
    assert torch.equal(outputs[0][0], alone)
    for m, (logits, labels) in zip((a, b), outputs[1:], strict=True):
        x, y = CountingReads().tensors
        assert torch.allclose(logits, m.network.layer(x)) and torch.equal(labels, y)
    again = CountingReads()
    members_logits([cached, a, b], loader(again), torch.device("cpu"), tmp_path, "split", "t")
    assert again.reads == 0  # all cached: the data is not read at all
