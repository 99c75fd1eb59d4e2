"""diffdistill: diffusion step distillation over diffusers pipelines."""

from . import export
from .backbone import Cond, DiffusionBackbone
from .config import load_config
from .eval.harness import evaluate
from .export import export_run, export_student, load_run_student, load_student
from .pipeline import Teacher, load_teacher
from .sampling import generate, sample_ode, sample_student
from .schedule import FlowSchedule, VPSchedule, convert
from .trainer import train

__version__ = "0.1.0"
__all__ = [
           "Cond",
           "DiffusionBackbone",
           "FlowSchedule",
           "Teacher",
           "VPSchedule",
           "convert",
           "evaluate",
           "export",
           "export_run",
           "export_student",
           "generate",
           "load_config",
           "load_run_student",
           "load_student",
           "load_teacher",
           "sample_ode",
           "sample_student",
           "train",
]
