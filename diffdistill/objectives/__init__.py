"""Distillation objectives: one file per paper family; the registry is a plain dict."""

from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase
from .regression import Regression

OBJECTIVES = {"regression": Regression}

__all__ = ["OBJECTIVES", "Batch", "LossOut", "Objective", "ObjectiveConfig", "Phase", "Regression"]
