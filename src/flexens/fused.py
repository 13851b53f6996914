"""Members of one architecture run as one fused call: stacked weights + ``vmap``.

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
from torch.func import functional_call, vmap
from torch.fx import GraphModule

from flexens.halting import running_mean


def architecture_key(network: nn.Module) -> tuple:
    """What two networks must share to be stacked: class (for a ``torch.fx`` graph, as folded
    members are, its code), every submodule's class, and every parameter/buffer shape."""
    shapes = tuple(
        (name, tuple(t.shape), t.dtype)
        for name, t in [*network.named_parameters(), *network.named_buffers()]
    )
    layers = tuple((name, type(m).__qualname__) for name, m in network.named_modules() if name)
    kind = network.code if isinstance(network, GraphModule) else type(network).__qualname__
    return (kind, layers, shapes)


def can_fuse(networks: Sequence[nn.Module]) -> bool:
    """Whether all ``networks`` share one architecture (and there are at least two)."""
    return len(networks) >= 2 and len({architecture_key(n) for n in networks}) == 1


def stacked_state(networks: Sequence[nn.Module]) -> tuple[dict, dict]:
    """Every parameter and buffer stacked along a new first dim: ``stack_module_state`` without
    its same-class check, which ``torch.fx`` graphs (a class per instance, as folded members
    are) fail; :func:`can_fuse` has checked they share one architecture. Contiguous, as
    stacked channels_last weights would make ``vmap``'s grouped convolutions slower."""

    def stack(tensors: list[Tensor]) -> Tensor:
        return torch.stack(tensors).detach().contiguous()

    params = [dict(n.named_parameters()) for n in networks]
    buffers = [dict(n.named_buffers()) for n in networks]
    return (
        {name: stack([p[name] for p in params]) for name in params[0]},
        {name: stack([b[name] for b in buffers]) for name in buffers[0]},
    )


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
        params, buffers = stacked_state(networks)
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


class FusedTail:
    """Members ``first..N-1`` as the halting loop's probability functions (*fused
    continuation*): the call for stage ``first`` runs them all in one fused call on the
    samples that reach it; each later stage hands out its member's rows for the samples
    still undecided, which :meth:`narrow` tracks as the loop shrinks its batch."""

    def __init__(self, fused: FusedMembers, first: int) -> None:
        self.fused, self.first = fused, first
        self.probs: Tensor | None = None

    def functions(self) -> list:
        """One probability function per remaining stage, for ``running_means``."""
        return [self._start] + [
            (lambda x, j=j: self.probs[j]) for j in range(1, self.fused.num_members - self.first)
        ]

    def _start(self, x: Tensor) -> Tensor:
        self.probs = self.fused(x, self.first)
        return self.probs[0]

    def narrow(self, keep: Tensor | None) -> None:
        """The loop kept rows ``keep`` of its current batch: keep the same rows here."""
        if keep is not None and self.probs is not None:
            self.probs = self.probs[:, keep]
