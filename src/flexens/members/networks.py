"""Network factory: the small CIFAR-scale default, torchvision AlexNet, or any timm model."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)


class SmallConvNet(nn.Module):
    """``depth`` conv-BN-ReLU blocks, channel count doubling from ``width``, pooling between.

    Max-pooling uses ``ceil_mode`` so the same network runs on 8×8 digits and 32×32 CIFAR.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        width: int = 16,
        depth: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i in range(depth):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_weights_file(pretrained: str | bool | None) -> bool:
    """A local path rather than a hub tag: it exists, has a path separator or a weights suffix."""
    if not isinstance(pretrained, str):
        return False
    path = Path(pretrained).expanduser()
    return (
        path.exists()
        or any(s in pretrained for s in ("/", "\\", "~"))
        or (path.suffix.lower() in WEIGHT_SUFFIXES)
    )


def create_network(
    arch: str, num_classes: int, in_chans: int = 3, pretrained: str | bool | None = None, **kwargs
) -> nn.Module:
    """Build a member network by name.

    ``pretrained`` is ``None``/``False`` (random init), a local weights file
    (``.pt``/``.pth``/``.bin``/``.safetensors``, loaded after construction; tensors of
    another shape, such as a classifier head for other classes, stay freshly initialised),
    ``True`` (timm's default pretrained weights for ``arch``) or a timm tag such as
    ``a1_in1k`` (weights ``<arch>.<tag>``). Hub weights come from the Hugging Face hub, so they
    need network access or a filled cache; offline, pass a file instead.
    """
    hub = pretrained is True or (isinstance(pretrained, str) and not is_weights_file(pretrained))
    if arch == "small_cnn":
        net = _construct(
            arch,
            lambda: SmallConvNet(num_classes=num_classes, in_chans=in_chans, **kwargs),
            kwargs,
        )
    elif arch == "alexnet":
        if in_chans != 3:
            raise ValueError(
                f"alexnet takes 3-channel images, this data has {in_chans}; pick another model="
            )
        net = _construct(
            arch, lambda: torchvision.models.alexnet(num_classes=num_classes, **kwargs), kwargs
        )
    elif timm.is_model(arch):
        if hub:
            return _timm_from_hub(arch, pretrained, num_classes, in_chans, **kwargs)
        net = _construct(
            arch,
            lambda: timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **kwargs),
            kwargs,
        )
    else:
        raise ValueError(
            f"unknown model architecture {arch!r}; use small_cnn, alexnet or a timm model name "
            "(see timm.list_models())"
        )
    if hub:
        raise ValueError(
            f"model.pretrained={pretrained!r} names hub weights, which only timm models have; "
            f"for {arch!r} pass a local weights file: model.pretrained=/path/to/weights.pth"
        )
    if pretrained:
        load_weights(net, pretrained)
    return net


_UNEXPECTED = re.compile(r"(?:([\w.]+)\.__init__\(\) |^)got an unexpected keyword argument '(\w+)'")
_NOT_LISTED = {"self", "num_classes", "in_chans", "pretrained", "device", "dtype"}
"""Constructor arguments that flexens sets itself (or that place tensors), not model.kwargs."""


def _unexpected_kwarg(err: TypeError, kwargs: dict) -> str | None:
    """The model.kwargs key a constructor refused, or None for any other TypeError."""
    match = _UNEXPECTED.search(str(err))
    return match.group(2) if match and match.group(2) in kwargs else None


def _network_class(arch: str, err: TypeError) -> type | None:
    """The class whose constructor refused the kwarg: ours, torchvision's AlexNet, or timm's."""
    if arch == "small_cnn":
        return SmallConvNet
    if arch == "alexnet":
        return torchvision.models.AlexNet
    match = _UNEXPECTED.search(str(err))
    if not match or not match.group(1):
        return None
    try:  # timm: the class lives in the module of the model's entry point
        module = importlib.import_module(timm.models.model_entrypoint(arch).__module__)
    except Exception:
        return None
    found = getattr(module, match.group(1).rsplit(".", 1)[-1], None)
    return found if isinstance(found, type) else None


def _kwarg_error(arch: str, err: TypeError, kwargs: dict) -> ValueError:
    """One line: which model.kwargs key the architecture refused, what it does accept."""
    bad = _unexpected_kwarg(err, kwargs)
    cls = _network_class(arch, err)
    accepted = ""
    if cls is not None:
        params = inspect.signature(cls).parameters.values()
        names = [
            p.name
            for p in params
            if p.name not in _NOT_LISTED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        accepted = f" ({cls.__name__} accepts: {', '.join(names) or 'none'})"
    return ValueError(
        f"model.kwargs.{bad} is not an argument of the {arch!r} architecture{accepted}; "
        f"remove model.kwargs.{bad} or rename it to one of those"
    )


def _construct(arch: str, build: Callable[[], nn.Module], kwargs: dict) -> nn.Module:
    """``build()``, with a constructor's refusal of a model.kwargs key as a one-line error."""
    try:
        return build()
    except TypeError as err:
        if _unexpected_kwarg(err, kwargs) is None:
            raise
        raise _kwarg_error(arch, err, kwargs) from None


def _timm_from_hub(
    arch: str, tag: str | bool, num_classes: int, in_chans: int, **kwargs
) -> nn.Module:
    """timm's pretrained weights; every failure becomes one line that says what to do instead."""
    name = arch if tag is True or "." in arch else f"{arch}.{tag}"
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except TypeError as err:  # timm builds the network before it fetches: a bad model.kwargs
        if _unexpected_kwarg(err, kwargs) is None:
            raise
        raise _kwarg_error(arch, err, kwargs) from None
    except Exception as err:  # timm/huggingface_hub raise many types when the hub is unreachable
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConnectionError(
            f"could not fetch pretrained weights {name!r} from the Hugging Face hub "
            f"({type(err).__name__}: {reason}); without network access download them elsewhere "
            "and pass the file: model.pretrained=/path/to/model.safetensors"
        ) from None


def load_weights(net: nn.Module, path: str) -> None:
    """Load a local state dict, skipping tensors whose shape differs (e.g. a new head)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {str(file)!r} does not exist; fix model.pretrained"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = net.state_dict()
    for prefix in ("net.", "module."):  # a Lightning MemberModule checkpoint, a DDP-wrapped save
        if not any(k in own for k in state) and any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(
            f"no tensor in {str(file)!r} fits this network; is it for another architecture?"
        )
    net.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    log.info(
        "loaded %d/%d tensors from %s; freshly initialised: %s",
        len(usable),
        len(own),
        file,
        ", ".join(fresh) or "none",
    )
