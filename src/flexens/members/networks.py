"""Network factory: timm's ``create_model`` for every timm name (the small CIFAR-scale default
is registered with timm), torchvision's ``get_model`` for torchvision-only names (AlexNet)."""

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
from timm.models import register_model
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


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """timm entry point of :class:`SmallConvNet`, so ``timm.create_model("small_cnn")`` works."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm passes its hub settings to every entry point
    if pretrained:
        raise ValueError("small_cnn has no hub weights; pass a local weights file")
    return SmallConvNet(**kwargs)


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
    """Build a member network by name: timm first, then torchvision.

    ``pretrained`` is ``None``/``False`` (random init), a local weights file
    (``.pt``/``.pth``/``.bin``/``.safetensors``, loaded after construction; tensors of
    another shape, such as a classifier head for other classes, stay freshly initialised),
    ``True`` (timm's default pretrained weights for ``arch``) or a timm tag such as
    ``a1_in1k`` (weights ``<arch>.<tag>``). Hub weights come from the Hugging Face hub, so they
    need network access or a filled cache; offline, pass a file instead.
    """
    build = network_builder(arch, in_chans)
    if pretrained is True or (isinstance(pretrained, str) and not is_weights_file(pretrained)):
        if not (timm.is_model(arch) and timm.models.is_model_pretrained(arch)):
            raise ValueError(
                f"model.pretrained={pretrained!r} names hub weights, which {arch!r} has none "
                f"of; pass a local weights file: model.pretrained=/path/to/weights.pth"
            )
        return _timm_from_hub(arch, pretrained, num_classes, in_chans, **kwargs)
    net = _construct(arch, lambda: build(num_classes=num_classes, **kwargs), kwargs)
    if pretrained:
        load_weights(net, pretrained)
    return net


def network_builder(arch: str, in_chans: int) -> Callable[..., nn.Module]:
    """``timm.create_model`` for a timm name, ``torchvision.models.get_model`` otherwise."""
    if timm.is_model(arch):
        return lambda **kw: timm.create_model(arch, in_chans=in_chans, **kw)
    if arch in torchvision.models.list_models():
        if in_chans != 3:
            raise ValueError(
                f"{arch} takes 3-channel images, this data has {in_chans}; pick another model="
            )
        return lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)
    raise ValueError(
        f"unknown model architecture {arch!r}; use a timm model name (see timm.list_models(), "
        "small_cnn is the default) or a torchvision one such as alexnet"
    )


_UNEXPECTED = re.compile(r"(?:([\w.]+)\.__init__\(\) |^)got an unexpected keyword argument '(\w+)'")
_NOT_LISTED = {"self", "num_classes", "in_chans", "pretrained", "device", "dtype"}
"""Constructor arguments that flexens sets itself (or that place tensors), not model.kwargs."""


def _unexpected_kwarg(err: TypeError, kwargs: dict) -> str | None:
    """The model.kwargs key a constructor refused, or None for any other TypeError."""
    match = _UNEXPECTED.search(str(err))
    return match.group(2) if match and match.group(2) in kwargs else None


def _network_class(arch: str, err: TypeError) -> type | None:
    """The class whose constructor refused the kwarg: it lives in the module of the model's
    timm entry point or torchvision builder."""
    match = _UNEXPECTED.search(str(err))
    if not match or not match.group(1):
        return None
    try:
        entry = (
            timm.models.model_entrypoint(arch)
            if timm.is_model(arch)
            else torchvision.models.get_model_builder(arch)
        )
        module = importlib.import_module(entry.__module__)
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
    """Load a local state dict, skipping tensors whose shape differs (e.g. a new head).

    timm's ``load_state_dict`` reads safetensors or a tensors-only pickle (``weights_only``:
    nothing in the file runs) and unwraps ``state_dict``/``model`` keys and DDP prefixes.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {str(file)!r} does not exist; fix model.pretrained"
        )
    try:
        state = timm.models.load_state_dict(str(file), use_ema=False, weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot read weights from {str(file)!r} ({type(err).__name__}: {reason}); pass a "
            "safetensors file or a torch state dict of tensors"
        ) from None
    own = net.state_dict()
    if not any(k in own for k in state) and any(k.startswith("net.") for k in state):
        state = {k.removeprefix("net."): v for k, v in state.items()}  # a Lightning checkpoint
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
