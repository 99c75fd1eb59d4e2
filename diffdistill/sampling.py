"""Samplers as plain functions over a :class:`~diffdistill.backbone.DiffusionBackbone`.

Teacher ODE solvers (:func:`sample_ode`) integrate the probability-flow ODE over a decreasing grid of
``n + 1`` times. Any schedule ``x_t = alpha x0 + sigma eps`` becomes the straight path
``x^ = (1 - tau) x0 + tau eps`` after rescaling ``x^ = x_t / (alpha + sigma)``,
``tau = sigma / (alpha + sigma)``, with velocity ``d x^ / d tau = eps - x0``. Both solvers work in that
one coordinate system:

* ``euler``: one model call per step. In ``x_t`` it reads ``x_next = alpha' x0 + sigma' eps`` -- DDIM
  with ``eta = 0`` (Song et al. 2021, eq. 12) on VP schedules, and exactly the flow-matching Euler
  step (diffusers' ``FlowMatchEulerDiscreteScheduler``) on flow schedules: one formula, two names.
* ``heun``: Heun's second-order correction (Karras et al. 2022, Alg. 1) on the same velocity; two
  calls per step, Euler on the last step into ``t = 0``.

Student sampling (:func:`sample_student`) is the few-step rule of DMD2 and LCM -- predict ``x0``, then,
unless it is the last step, re-noise it to the next time with fresh noise -- or, with ``gamma < 1``,
TCD's stochastic DDIM rule (``gamma = 0``: deterministic DDIM, as PCM samples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .backbone import Cond, DiffusionBackbone
from .schedule import FlowSchedule, _as_time, to_x0_eps

SOLVERS = ("euler", "ddim", "heun")


def _times(ts, min_len: int) -> list[float]:
    ts = [float(t) for t in (ts.tolist() if torch.is_tensor(ts) else ts)]
    if len(ts) < min_len:
        raise ValueError(f"need at least {min_len} times, got {len(ts)}")
    if any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"times must lie in [0, 1], got {ts}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"times must be strictly decreasing, got {ts}")
    return ts


def _check_batch(x: torch.Tensor, cond: Cond, uncond: Cond | None) -> None:
    for name, c in (("cond", cond), ("uncond", uncond)):
        if c is not None and c.batch_size not in (1, x.shape[0]):
            raise ValueError(f"{name} holds {c.batch_size} prompts but there are {x.shape[0]} latents; "
                             "pass one prompt per latent (or a single prompt for all)")


def _x0_eps(backbone: DiffusionBackbone, x: torch.Tensor, t: float, cond, uncond, guidance):
    pred = backbone.cfg(x, t, cond, uncond, guidance, out=backbone.pred_type)
    return to_x0_eps(pred, x, t, backbone.pred_type, backbone.schedule)


@torch.no_grad()
def sample_ode(backbone: DiffusionBackbone, noise: torch.Tensor, cond: Cond, ts: Sequence[float] | torch.Tensor,
               *, uncond: Cond | None = None, guidance: float = 1.0, solver: str = "euler",
               progress: bool = False) -> torch.Tensor:
    """Integrate from ``x = noise`` at ``ts[0]`` to ``ts[-1]`` (``len(ts) - 1`` steps) with CFG scale
    ``guidance`` (diffusers convention). Returns ``x`` at ``ts[-1]`` (the clean sample when it is 0)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    ts = _times(ts, 2)
    _check_batch(noise, cond, uncond)
    sched = backbone.schedule
    a_s = lambda t: (float(sched.alpha(t)), float(sched.sigma(t)))
    x = noise
    for t, t_next in tqdm(list(zip(ts, ts[1:])), desc=f"{solver} sampling", disable=not progress, leave=False):
        (a, s), (a2, s2) = a_s(t), a_s(t_next)
        x0, eps = _x0_eps(backbone, x, t, cond, uncond, guidance)
        if solver != "heun" or t_next == 0.0:
            x = a2 * x0 + s2 * eps
            continue
        tau, tau2 = s / (a + s), s2 / (a2 + s2)
        x_hat = x / (a + s)
        u = eps - x0
        x_pred = (x_hat + (tau2 - tau) * u) * (a2 + s2)
        x0_2, eps_2 = _x0_eps(backbone, x_pred, t_next, cond, uncond, guidance)
        x = (x_hat + (tau2 - tau) * 0.5 * (u + eps_2 - x0_2)) * (a2 + s2)
    return x


def step_landing(sched, ts: Sequence[float], i: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_next, t_s)`` of step ``i`` of the ``gamma`` sampler over ``ts``: the time the step heads for (the
    next of ``ts``; after the last, timestep 0 on VP, ``t = 0`` on flow) and where its DDIM jump lands, TCD's
    ``floor((1 - gamma) k_next)`` in training-grid indices (``t_next`` itself for ``gamma = 0`` on flow)."""
    last = i + 1 == len(ts)
    if isinstance(sched, FlowSchedule):
        t_next = _as_time(0.0 if last else ts[i + 1])
        t_s = t_next if gamma == 0.0 else sched.index_time(torch.floor((1 - gamma) * sched.time_index(t_next)))
    else:
        t_next = sched.from_timestep(0.0) if last else _as_time(ts[i + 1])
        t_s = sched.from_timestep(torch.floor((1 - gamma) * sched.to_timestep(t_next)))
    return t_next, t_s


def next_student_input(sched, x0: torch.Tensor, eps: torch.Tensor | None, ts: Sequence[float], i: int, gamma: float,
                       fresh: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The input of step ``i + 1`` of the ``gamma`` sampler (:func:`sample_student`) over ``ts``, from step ``i``'s
    prediction ``(x0, eps)`` (``eps`` unused at ``gamma = 1``); ``fresh(like)`` draws standard noise shaped as
    ``like``, once unless ``gamma = 0``. Shared by sampling and by training's backward simulation, so a student is
    trained on the inputs it samples from."""
    if gamma == 1.0:
        return sched.add_noise(x0, fresh(x0), ts[i + 1])
    t_next, t_s = step_landing(sched, ts, i, gamma)
    x = sched.add_noise(x0, eps, t_s)
    if gamma == 0.0:
        return x
    if isinstance(sched, FlowSchedule):  # the forward process from s to t_next: x_s (a' / a_s) plus noise of variance
        ratio = float(sched.alpha(t_next) / sched.alpha(t_s))  # sigma'^2 - (a' / a_s)^2 sigma_s^2
        std = max(float(sched.sigma(t_next)) ** 2 - (ratio * float(sched.sigma(t_s))) ** 2, 0.0) ** 0.5
        return ratio * x + std * fresh(x)
    keep = float(sched.alpha(t_next) / sched.alpha(t_s)) ** 2  # alpha_bar_next / alpha_bar_s
    return keep ** 0.5 * x + (1 - keep) ** 0.5 * fresh(x)


@torch.no_grad()
def sample_student(backbone: DiffusionBackbone, noise: torch.Tensor, cond: Cond, ts: Sequence[float] | torch.Tensor,
                   *, uncond: Cond | None = None, guidance: float = 1.0,
                   generator: torch.Generator | None = None, gamma: float = 1.0) -> torch.Tensor:
    """Few-step student sampling at the times ``ts`` (strictly decreasing, e.g. ``[1.0]`` for one step).

    ``gamma = 1`` (LCM's multistep sampler, diffusers' ``LCMScheduler``): predict ``x0``, re-noise it to the
    next time with fresh noise from ``generator``; return the last ``x0``.
    ``gamma < 1`` (TCD's strategic stochastic sampling, Zheng et al. 2024, Alg. 4; diffusers'
    ``TCDScheduler`` with ``eta = gamma``): from the prediction ``(x0, eps)`` jump by DDIM to the
    timestep ``s = floor((1 - gamma) k_next)``, ``x_s = alpha_s x0 + sigma_s eps``, then, unless it is the
    last step, add fresh noise from ``s`` up to the next time. ``gamma = 0`` is deterministic DDIM (PCM's
    sampler). The last step lands on the first training timestep (``k = 0``), as TCD's does.
    On a flow schedule ``k`` is the training-grid index (``schedule.time_index``: the flow scheduler's
    shifted training sigmas), ``gamma = 0`` steps exactly to the next time (the flow Euler step
    ``x + (t' - t) v``, diffusers' ``FlowMatchEulerDiscreteScheduler`` without stochastic sampling), the
    fresh noise is the forward process from ``s`` to the next time, and the last step lands on ``t = 0``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    ts = _times(ts, 1)
    _check_batch(noise, cond, uncond)
    sched = backbone.schedule
    x = noise
    for i, t in enumerate(ts):
        if gamma == 1.0:
            x0, eps = backbone.cfg(x, t, cond, uncond, guidance, out="x0"), None
        else:
            x0, eps = _x0_eps(backbone, x, t, cond, uncond, guidance)
        if i + 1 == len(ts):
            return x0 if gamma == 1.0 else sched.add_noise(x0, eps, step_landing(sched, ts, i, gamma)[1])
        x = next_student_input(sched, x0, eps, ts, i, gamma, lambda like: backbone.randn_like(like, generator))
    raise AssertionError("unreachable")


@torch.no_grad()
def generate(teacher, prompts: Sequence[str], *, num_steps: int = 25, guidance: float = 7.5,
             generator: torch.Generator | None = None, solver: str = "euler", ts=None,
             progress: bool = False, negative_prompt: str | None = None) -> torch.Tensor:
    """Text -> images in ``[0, 1]`` ``(B, 3, H, W)`` with the teacher's own DDIM grid (or ``ts``):
    the same result as ``StableDiffusionPipeline`` with a ``DDIMScheduler`` at the same seed (and the
    same ``negative_prompt``, which takes the empty prompt's place in CFG)."""
    from .pipeline import sampling_grid

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    embedded = teacher.backbone.embeds_guidance  # FLUX.1-dev: the scale is told to the network, no CFG branch
    if embedded and negative_prompt is not None:
        raise ValueError(f"{type(teacher.backbone.denoiser).__name__} embeds the guidance scale and runs no CFG branch: "
                         "there is no unconditional prediction for a negative prompt to replace")
    cond = teacher.encode_prompt(prompts)
    uncond = None
    if guidance != 1.0 and not embedded:
        uncond = teacher.empty_cond(len(prompts)) if negative_prompt is None else \
            teacher.encode_prompt([negative_prompt] * len(prompts))
    shape = (len(prompts), *teacher.latent_shape)
    noise = torch.randn(shape, generator=generator, device=teacher.device, dtype=teacher.dtype)
    ts = sampling_grid(teacher, num_steps) if ts is None else ts
    latents = sample_ode(teacher.backbone, noise, cond, ts, uncond=uncond, guidance=guidance, solver=solver,
                         progress=progress)
    return (teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
