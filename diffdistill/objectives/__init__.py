"""Distillation objectives: one file per paper family; the registry is a plain dict."""

from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase
from .dmd import DMD, DMD2
from .regression import Regression

OBJECTIVES = {"regression": Regression, "dmd": DMD, "dmd2": DMD2}

__all__ = ["DMD", "DMD2", "OBJECTIVES", "Batch", "LossOut", "Objective", "ObjectiveConfig", "Phase", "Regression"]
