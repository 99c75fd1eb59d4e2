"""measure_speed on the tiny pipeline: report structure, and NFE counted from real denoiser calls
(never timing values: speed is a benchmark, not a test)."""

from functools import partial

import pytest
from conftest import TINY_PROMPTS

from diffdistill.eval.speed import SpeedReport, measure_speed
from diffdistill.sampling import sample_ode, sample_student

pytestmark = pytest.mark.usefixtures("one_thread")


class _Count:
    def __init__(self, module):
        self.calls, self.rows = 0, 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module, args, _output):
        self.calls += 1
        self.rows += args[0].shape[0]


def _measure(teacher, warmup=0, repeats=1, **kwargs):
    """measure_speed with an independent hook counting every denoiser call it makes."""
    counter = _Count(teacher.backbone.denoiser)
    try:
        report = measure_speed(teacher, TINY_PROMPTS, warmup=warmup, repeats=repeats, **kwargs)
    finally:
        counter.handle.remove()
    return report, counter


def test_report_structure_and_euler_nfe(tiny_teacher):
    report, counter = _measure(tiny_teacher, num_steps=2, warmup=1, repeats=2)
    assert isinstance(report, SpeedReport)
    assert counter.calls == 3 * 2  # (warmup 1 + repeats 2) runs x 2 steps: each step one real call
    assert report.denoiser_calls == 2 and report.nfe == 2
    assert report.batch_size == len(TINY_PROMPTS) and report.repeats == 2
    d = report.to_dict()
    for key in ("ms_text", "ms_denoiser", "ms_vae_decode", "ms_per_image", "images_per_second", "nfe",
                "denoiser_calls", "batch_size", "device", "dtype"):
        assert key in d
    assert min(d["ms_text"], d["ms_denoiser"], d["ms_vae_decode"]) > 0
    assert d["ms_per_image"] == pytest.approx(d["ms_text"] + d["ms_denoiser"] + d["ms_vae_decode"])
    assert d["images_per_second"] == pytest.approx(1000 / d["ms_per_image"])
    assert d["device"] == "cpu" and d["dtype"] == "float32"


def test_cfg_doubles_nfe_not_calls(tiny_teacher):
    report, counter = _measure(tiny_teacher, num_steps=2, guidance=3.0)
    assert counter.calls == 2 and counter.rows == 2 * 2 * len(TINY_PROMPTS)  # both branches in one call
    assert report.denoiser_calls == 2 and report.nfe == 4


def test_nfe_of_heun_and_student_samplers(tiny_teacher):
    heun, counter = _measure(tiny_teacher, num_steps=2, sampler=partial(sample_ode, solver="heun"))
    assert heun.denoiser_calls == counter.calls and heun.nfe == counter.rows / len(TINY_PROMPTS)
    assert heun.nfe > 2  # Heun's corrector adds calls the step count does not show
    student, counter = _measure(tiny_teacher, ts=[1.0, 0.5], sampler=sample_student)
    assert counter.calls == 2 and student.nfe == 2 and student.denoiser_calls == 2


def test_bad_repeats_are_rejected(tiny_teacher):
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_speed(tiny_teacher, TINY_PROMPTS, repeats=0)
