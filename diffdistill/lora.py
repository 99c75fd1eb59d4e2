"""peft LoRA adapters on a diffusers denoiser: add them, and switch between them without touching
``requires_grad``.

Why not peft's own switches: ``set_adapters(name)`` / ``disable_adapters()`` also set
``requires_grad`` on the adapter weights. In shared-base mode one network is the frozen teacher
(adapters off), the student (adapter ``student``) and the fake score (adapter ``fake_score``); when a
switch happens between a student forward and its ``backward()``, peft's switch would turn the
student's LoRA weights into non-leaves-for-autograd (``requires_grad=False``) and autograd would
silently drop their gradient. :func:`active_adapter` only flips which adapter the layers run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters attached to ``model`` (empty if none)."""
    config = getattr(model, "peft_config", None) or {}
    return list(config)


def add_lora(model: nn.Module, name: str, rank: int, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> None:
    """Attach a LoRA adapter ``name`` (rank ``rank``, ``lora_alpha`` = ``alpha`` or ``rank``) to a diffusers
    model. Earlier adapters keep their ``requires_grad`` (peft would freeze them); the new one is
    trainable; the base weights are left as they were."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists on this model")
    before = {id(p): p.requires_grad for p in model.parameters()}
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    model.add_adapter(config, adapter_name=name)
    for pname, p in model.named_parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])
        else:
            p.requires_grad_(f".{name}." in pname)


def lora_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """The parameters of adapter ``name``."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; this model has {adapter_names(model)}")
    for pname, p in model.named_parameters():
        if f".{name}." in pname:
            yield p


def set_active(model: nn.Module, name: str | None) -> None:
    """Run adapter ``name`` from now on (``None``: all adapters off, the base model). Gradient-safe."""
    if name is not None and name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; this model has {adapter_names(model)}")
    for layer in _tuner_layers(model):
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]


def current(model: nn.Module) -> str | None:
    """The adapter that runs now (``None``: adapters off or none attached)."""
    layers = _tuner_layers(model)
    if not layers or layers[0].disable_adapters:
        return None
    active = layers[0].active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None):
    """Context in which ``model`` runs adapter ``name`` (``None``: base); restores the previous one."""
    if name is None and not adapter_names(model):
        yield model
        return
    previous = current(model)
    set_active(model, name)
    try:
        yield model
    finally:
        set_active(model, previous)
