"""Distillation objectives: one file per paper family; the registry is a plain dict."""

from .adversarial import ADD, LADD
from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase
from .consistency import LCM, PCM, TDD
from .dmd import DMD, DMD2, DPDMD
from .regression import Regression
from .vsd import SNOOPI, VSD

OBJECTIVES = {"regression": Regression, "dmd": DMD, "dmd2": DMD2, "dpdmd": DPDMD, "lcm": LCM, "pcm": PCM, "tdd": TDD,
              "swiftbrush": VSD, "snoopi": SNOOPI,
              "ladd": LADD, "add": ADD}

__all__ = ["ADD", "DMD", "DMD2", "DPDMD", "LADD", "LCM", "OBJECTIVES", "PCM", "SNOOPI", "TDD", "VSD", "Batch", "LossOut", "Objective", "ObjectiveConfig", "Phase", "Regression"]
