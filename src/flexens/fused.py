"""Members of one architecture run as one fused call: ``stack_module_state`` + ``vmap``.

At batch 1 on a CPU a small network is dominated by per-operator dispatch, not arithmetic:
five members one after another pay that cost five times, the fused call once (the stacked
weights turn every convolution into one grouped convolution). That makes the fused full
ensemble the strongest baseline a flexible ensemble has to beat at small batches, and it
lets a flexible ensemble run the members left after stage ``k`` in one call when that is
cheaper than running them one by one (*fused continuation*).

Fusing changes how the arithmetic is grouped, not what is computed: outputs agree with the
sequential members to float rounding (checked by ``tests/test_fused.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from flexens.halting import Criterion, running_mean, should_halt


def architecture_key(network: nn.Module) -> tuple:
    """What two networks must share to be stacked: class and every parameter/buffer shape."""
    shapes = tuple(
        (name, tuple(t.shape), t.dtype)
        for name, t in [*network.named_parameters(), *network.named_buffers()]
    )
    return (type(network).__qualname__, shapes)


def can_fuse(networks: Sequence[nn.Module]) -> bool:
    """Whether all ``networks`` share one architecture (and there are at least two)."""
    return len(networks) >= 2 and len({architecture_key(n) for n in networks}) == 1


class FusedMembers(nn.Module):
    """``forward(x)`` → every member's class probabilities, ``(N, B, C)``, in one call.

    The weights are copied into stacked tensors once (inference only: later changes to the
    original members are not seen), and the skeleton module lives on the ``meta`` device so
    it holds no second copy of them.
    """

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        if not can_fuse(networks):
            raise ValueError(
                "fused execution needs at least two members of one architecture; "
                "run them sequentially (infer.fused=false)"
            )
        networks = [n.eval() for n in networks]
        params, buffers = stack_module_state(networks)
        self.num_members = len(networks)
        self._names = (list(params), list(buffers))
        for i, t in enumerate([*params.values(), *buffers.values()]):
            self.register_buffer(f"stacked_{i}", t.detach().clone(), persistent=False)
        self.skeleton = [copy.deepcopy(networks[0]).to("meta").eval()]  # not a submodule

    def _state(self) -> tuple[dict, dict]:
        tensors = [getattr(self, f"stacked_{i}") for i in range(sum(map(len, self._names)))]
        params = dict(zip(self._names[0], tensors, strict=False))
        buffers = dict(zip(self._names[1], tensors[len(self._names[0]) :], strict=True))
        return params, buffers

    def forward(self, x: Tensor, first: int = 0) -> Tensor:
        """Probabilities of members ``first..N-1`` on ``x``: ``(N - first, B, C)``."""
        params, buffers = self._state()
        if first:
            params = {k: v[first:] for k, v in params.items()}
            buffers = {k: v[first:] for k, v in buffers.items()}
        skeleton = self.skeleton[0]

        def one(p: dict, b: dict, inp: Tensor) -> Tensor:
            return functional_call(skeleton, (p, b), (inp,)).float().softmax(dim=-1)

        return vmap(one, in_dims=(0, 0, None))(params, buffers, x)

    def full(self, x: Tensor) -> Tensor:
        """The averaged full ensemble, summed in member order as the sequential loop does."""
        probs = self(x)
        prob_sum = probs[0]
        for k in range(1, self.num_members):
            prob_sum = prob_sum + probs[k]
        return running_mean(prob_sum, self.num_members)


def finish_fused(
    fused: FusedMembers,
    x: Tensor,
    prob_sum: Tensor,
    first: int,
    thresholds: Sequence[float],
    criterion: Criterion,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stages ``first..N-1`` for the samples in ``x`` in one fused call.

    ``prob_sum`` is the running sum after stage ``first - 1``. Every remaining member runs
    on every sample; each sample then answers at the first stage that
    :func:`~flexens.halting.should_halt` accepts, exactly as the sequential loop would.
    Returns ``(probs, exit_stage, confidence)`` for these samples.
    """
    n = fused.num_members
    member_probs = fused(x, first)
    batch = x.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)
    probs_out = prob_sum.new_empty(prob_sum.shape)
    confidence = prob_sum.new_empty(batch)
    exit_stage = torch.full((batch,), n - 1, dtype=torch.long, device=x.device)
    for k in range(first, n):
        prob_sum = prob_sum + member_probs[k - first]
        mean = running_mean(prob_sum, k + 1)
        conf = criterion(mean)
        halt = should_halt(conf, thresholds[k] if k < n - 1 else 0.0, is_last=k == n - 1)
        now = halt & ~done
        probs_out[now] = mean[now]
        confidence[now] = conf[now]
        exit_stage[now] = k
        done |= halt
    return probs_out, exit_stage, confidence
