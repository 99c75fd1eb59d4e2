"""Exponential moving average of a module's floating-point parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import torch

ParamSource = Union[torch.nn.Module, dict, Iterable]


def _named(source: ParamSource):
    """``(name, parameter)`` pairs from a module, a dict, or an iterable of pairs."""
    if isinstance(source, torch.nn.Module):
        return list(source.named_parameters())
    if isinstance(source, dict):
        return list(source.items())
    return list(source)


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each optimizer step, with the usual
    warm-up ``decay_k = min(decay, (1 + k) / (10 + k))`` so early averages are not dominated by the
    random initialisation."""

    def __init__(self, source: ParamSource, decay: float = 0.999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: p.detach().clone().float() for k, p in _named(source)}

    @torch.no_grad()
    def update(self, source: ParamSource) -> None:
        self.num_updates += 1
        d = self.decay
        if self.warmup:
            d = min(d, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in _named(source):
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, source: ParamSource) -> None:
        for k, p in _named(source):
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.shadow = {k: state[k].clone().float() for k in self.shadow}
        self.num_updates = num_updates
