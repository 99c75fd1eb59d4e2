"""Samplers: exact answers on Gaussian data, student re-noising, input checks."""

import pytest
import torch
from conftest import GaussianDenoiser
from diffusers import DDPMScheduler

from diffdistill.backbone import Cond, DiffusionBackbone
from diffdistill.sampling import sample_ode, sample_student
from diffdistill.schedule import FlowSchedule, VPSchedule

C = 0.5  # data standard deviation
VP = VPSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
FLOW = FlowSchedule(shift=3.0)


def _exact(schedule, x_T, t_T, t_end):
    """For Gaussian data the probability-flow ODE is linear and keeps the marginals Gaussian:
    x_end = std(t_end) / std(t_T) x_T with std(t)^2 = a^2 c^2 + s^2."""
    std = lambda t: (schedule.alpha(t).item() ** 2 * C * C + schedule.sigma(t).item() ** 2) ** 0.5
    return std(t_end) / std(t_T) * x_T


@pytest.mark.parametrize("schedule,native", [(VP, "eps"), (VP, "v"), (FLOW, "flow"), (FLOW, "x0")])
def test_ode_solvers_converge_to_the_exact_solution(schedule, native):
    bb = DiffusionBackbone(GaussianDenoiser(schedule, native, c=C), schedule, native)
    x_T = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond = Cond(torch.zeros(1, 1, 1, dtype=torch.float64))
    errors = {}
    for solver in ("euler", "heun"):
        for n in (4, 8, 16):
            ts = torch.linspace(1.0, 0.02, n + 1, dtype=torch.float64)  # stop short of 0: Heun's last step is Euler
            exact = _exact(schedule, x_T, 1.0, 0.02)
            errors[solver, n] = (sample_ode(bb, x_T, cond, ts, solver=solver) - exact).abs().max().item()
    for solver in ("euler", "heun"):
        assert errors[solver, 16] < errors[solver, 8] < errors[solver, 4]
    assert errors["heun", 8] < errors["euler", 8] / 3
    assert errors["heun", 8] / errors["heun", 16] > 3  # second order: about 4x per halving
    assert errors["euler", 8] / errors["euler", 16] > 1.6  # first order: about 2x
    # one Euler step straight to 0 from the exact x at t gives the exact denoised mean on Gaussian data
    x_t = _exact(schedule, x_T, 1.0, 0.3)
    a, s = schedule.alpha(0.3).item(), schedule.sigma(0.3).item()
    x0 = sample_ode(bb, x_t, cond, [0.3, 0.0])
    assert torch.allclose(x0, a * C * C / (a * a * C * C + s * s) * x_t, atol=1e-9)


def test_sampler_calls_and_cfg():
    net = GaussianDenoiser(VP, "eps", c=C, cond_shift=1.0)
    bb = DiffusionBackbone(net, VP, "eps")
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = Cond(torch.ones(3, 2, 2)), Cond(torch.zeros(1, 2, 2))
    ts = VP.grid(5)
    plain = sample_ode(bb, x, cond, ts)
    assert len(net.calls) == 5
    guided = sample_ode(bb, x, cond, ts, uncond=uncond, guidance=3.0)
    assert not torch.allclose(plain, guided)
    net.calls.clear()
    sample_ode(bb, x, cond, ts, solver="heun")
    assert len(net.calls) == 9  # two calls per step, one on the last step into t = 0
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ode(bb, x, cond, [0.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="unknown solver"):
        sample_ode(bb, x, cond, ts, solver="rk4")
    with pytest.raises(ValueError, match="cond holds 2 prompts but there are 3 latents"):
        sample_ode(bb, x, Cond(torch.ones(2, 2, 2)), ts)


def test_student_sampler_predicts_then_renoises():
    net = GaussianDenoiser(VP, "eps", c=C)
    bb = DiffusionBackbone(net, VP, "eps")
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    cond = Cond(torch.zeros(1, 1, 1))
    one = sample_student(bb, noise, cond, [1.0])
    assert torch.allclose(one, bb(noise, 1.0, cond, out="x0"))
    ts = [1.0, 0.75, 0.5, 0.25]
    out = sample_student(bb, noise, cond, ts, generator=torch.Generator().manual_seed(7))
    # the same by hand, with the same noise stream
    g = torch.Generator().manual_seed(7)
    x = noise
    for i, t in enumerate(ts):
        x0 = bb(x, t, cond, out="x0")
        if i + 1 < len(ts):
            x = VP.add_noise(x0, torch.randn(x0.shape, generator=g), ts[i + 1])
    assert torch.allclose(out, x0)
    assert [round(c[0].item(), 6) for c in net.calls[-4:]] == ts
