"""Distillation objectives: one file per paper family; the registry is a plain dict."""

from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase
from .consistency import LCM, PCM, TDD
from .dmd import DMD, DMD2, DPDMD
from .regression import Regression
from .vsd import SNOOPI, VSD

OBJECTIVES = {"regression": Regression, "dmd": DMD, "dmd2": DMD2, "dpdmd": DPDMD, "lcm": LCM, "pcm": PCM, "tdd": TDD,
              "swiftbrush": VSD, "snoopi": SNOOPI}

__all__ = ["DMD", "DMD2", "DPDMD", "LCM", "OBJECTIVES", "PCM", "SNOOPI", "TDD", "VSD", "Batch", "LossOut", "Objective", "ObjectiveConfig", "Phase", "Regression"]
