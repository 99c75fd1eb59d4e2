"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: one training run from a config
file and overrides (``TwoPhase`` from test_trainer is registered for the two-phase case)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import TwoPhase

from diffdistill.config import load_config
from diffdistill.objectives import OBJECTIVES
from diffdistill.trainer import Trainer

OBJECTIVES["two_phase_test"] = TwoPhase
Trainer(load_config(sys.argv[1], sys.argv[2:])).run()
