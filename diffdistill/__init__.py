"""diffdistill: diffusion step distillation over diffusers pipelines."""

from .backbone import Cond, DiffusionBackbone
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
           "generate",
           "load_teacher",
           "sample_ode",
           "sample_student",
]
