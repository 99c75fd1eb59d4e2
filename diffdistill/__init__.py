"""diffdistill: diffusion step distillation over diffusers pipelines."""

from . import export
from .backbone import Cond, DiffusionBackbone
from .export import export_run, export_student, load_run_student, load_student
from .pipeline import Teacher, load_teacher
from .sampling import generate, sample_ode, sample_student
from .schedule import FlowSchedule, VPSchedule, convert

__version__ = "0.1.0"
__all__ = [
           "Cond",
           "DiffusionBackbone",
           "FlowSchedule",
           "Teacher",
           "VPSchedule",
           "convert",
           "export",
           "export_run",
           "export_student",
           "generate",
           "load_run_student",
           "load_student",
           "load_teacher",
           "sample_ode",
           "sample_student",
]
