"""Members run folded (BatchNorm into the convolution) in channels_last, and every path that
loads a member gets that same network."""

from __future__ import annotations

import torch
from torch import nn

from conftest import small_members
from flexens.fused import FusedMembers, can_fuse
from flexens.members.inference_form import inference_network
from flexens.members.registry import load_member, save_member


def batch_norms(network: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


def test_folding_keeps_the_outputs_and_drops_every_batchnorm(one_thread):
    (net,) = small_members(1)
    x = torch.randn(8, 3, 12, 12)
    folded = inference_network(net)
    assert batch_norms(net) > 0 and batch_norms(folded) == 0
    assert not folded.training
    weights = [p for p in folded.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(x[:1]), net(x[:1]), rtol=1e-5, atol=1e-5)
    assert batch_norms(net) > 0  # the original is left as it was


class Branchy(nn.Module):
    """Data-dependent control flow: ``torch.fx`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_a_network_fx_cannot_trace_runs_unfolded():
    net = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = net(x).clone()
        unfolded = inference_network(net)
        assert batch_norms(unfolded) == 1
        torch.testing.assert_close(unfolded(x), expected, rtol=1e-5, atol=1e-5)


def test_a_loaded_member_is_in_its_inference_form(tmp_path):
    (net,) = small_members(1)
    arch = {"arch": "small_cnn", "num_classes": 10, "in_chans": 3, "width": 4, "depth": 2}
    meta = {
        "seed": 0,
        "num_classes": 10,
        "class_names": list("0123456789"),
        "calib_fingerprint": "c",
    }
    path = save_member(tmp_path / "seed=0.safetensors", net, arch, meta)
    member = load_member(path)
    assert batch_norms(member.network) == 0 and not member.network.training
    trained = load_member(path, inference_form=False).network
    assert batch_norms(trained) > 0 and not trained.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), net.state_dict().values(), strict=True)
    )
    x = torch.randn(4, 3, 12, 12)
    with torch.inference_mode():
        torch.testing.assert_close(member.network(x), net(x), rtol=1e-5, atol=1e-5)


def test_folded_twins_still_fuse_and_other_graphs_do_not(one_thread):
    folded = [inference_network(n) for n in small_members(3)]
    assert can_fuse(folded)
    x = torch.randn(4, 3, 12, 12)
    with torch.inference_mode():
        sequential = torch.stack([n(x).softmax(-1) for n in folded])
        torch.testing.assert_close(FusedMembers(folded)(x), sequential, rtol=1e-5, atol=1e-6)
    # The same parameter shapes in another graph are not one architecture.
    relu, sigmoid = (
        inference_network(nn.Sequential(nn.Conv2d(3, 4, 3), a())) for a in (nn.ReLU, nn.Sigmoid)
    )
    assert not can_fuse([relu, sigmoid])
