"""A trained network in the form every inference path runs: BatchNorm folded into the
convolution before it, 4-D weights in channels_last.

Why: at batch 1 on a CPU, PyTorch sends a 3×3 convolution on a small NCHW input to its
reference im2col kernel (oneDNN only takes it for larger inputs), and every BatchNorm is
one more pass over the activations. Channels_last weights route every convolution to
oneDNN, and folding removes the BatchNorm passes. In the CIFAR-10 benchmark on the 2-core
VM this makes a member 1.3× faster at batch 1 and 1.7× at batch 256 (BENCHMARKS.md, timed
against the same weights as trained); larger inputs, such as the paper's 224-px ResNet-50,
already ran in oneDNN and gain only the folding.

The outputs change only by float rounding. Members are loaded in this form by
:func:`flexens.members.registry.load_member`, the one loader behind calibration (its cached
member outputs), the latency profile, ``infer.py`` and ``serve.py``, so the network whose
halting decisions are calibrated is the network that serves. :data:`INFERENCE_FORM` names
the procedure in the logit cache key and the latency profile: changing it invalidates both.
"""

from __future__ import annotations

import logging

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

log = logging.getLogger(__name__)

INFERENCE_FORM = "bn-folded+channels_last/1"
"""The procedure below, as recorded where member outputs or costs are stored."""


def inference_network(network: nn.Module) -> nn.Module:
    """``network`` (a trained member) folded for inference, in eval mode: a new module.

    Folding needs a ``torch.fx`` trace; a network with data-dependent control flow cannot
    be traced, keeps its BatchNorm layers and comes back itself, in channels_last.
    """
    network = network.eval()
    try:
        folded = fx_optimization.fuse(network)
    except Exception as err:  # fx raises many types for untraceable code; folding is optional
        log.info(
            "%s runs without BatchNorm folding: torch.fx cannot trace it (%s)",
            type(network).__name__,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        folded = network
    return folded.to(memory_format=torch.channels_last).eval()
