"""Consistency distillation: LCM and LCM-LoRA (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference"; Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion
Acceleration Module"). Reference implementation read: diffusers' examples/consistency_distillation.

One training step (LCM Algorithm 1, "latent consistency distillation"):

1. real latents ``x0`` (the VAE posterior mean of ``data.images``) with their captions ``c``;
2. a start time ``t_n`` drawn from the teacher solver's grid -- ``num_ddim_timesteps`` points, diffusers
   timesteps ``k = T/N * (i + 1) - 1`` (19, 39, ..., 999 for N = 50) -- and the target time one grid step
   below, ``k - T/N`` clamped at 0 (LCM's skipping step, sec. 4.4);
3. ``x_{t_n} = alpha x0 + sigma eps``;
4. the teacher's guided prediction at ``x_{t_n}`` with a CFG scale ``w ~ U[w_min, w_max]`` per sample
   (sec. 4.3), and one DDIM step with it to ``t_m``: ``x_{t_m} = alpha_m x0_T + sigma_m eps_T``;
5. the consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)``
   (:func:`functional.lcm_boundary_scalings`, sec. 4.2) of the student at ``(x_{t_n}, t_n)`` is pulled
   towards the target network's ``f`` at ``(x_{t_m}, t_m)`` (no gradient) with the pseudo-Huber loss.

Target network: for a full student an EMA copy of it (``target_decay`` 0.95, as diffusers' full LCM
script), updated after every student step and saved in checkpoints; for a LoRA student (LCM-LoRA) the
online student itself under ``no_grad``, as in diffusers' LCM-LoRA script. In shared-base mode the teacher
is the same network with adapters off.

Sampling (LCM's multistep sampler = diffusers' ``LCMScheduler``): ``f`` at each of ``student.timesteps``,
re-noised to the next with fresh noise. Our sampler returns the network's x0 prediction where LCM's returns
``f``; they differ by ``c_skip(k) (x - x0)``, and ``c_skip`` is below 7e-6 at every grid timestep >= 19
(3.7e-8 at the 4-step grid's last timestep 259): a negligible change, which lets the export keep its
exact pure-x0 ``LCMScheduler`` setting for every objective.

Defaults follow diffusers' LCM scripts for SD1.5: 50 DDIM timesteps, timestep scaling 10, sigma_data 0.5,
w in [5, 15] in the scripts' form ``cond + w (cond - uncond)`` -- CFG scales [6, 16] in our (diffusers)
convention --, the EMA target's 0.95, and the pseudo-Huber loss with c = 0.001 of their published
commands (their argparse default is l2).

Guidance embedding (LCM sec. 4.3, ``w``-conditioning; full students only): with
``student.guidance_embedding_dim`` (LCM: 256) the student gets diffusers' ``time_cond_proj_dim`` and is
told each sample's teacher scale ``w``; it then samples in one pass at ``student.guidance``, as
``StableDiffusionPipeline`` does for such UNets. Without it (LoRA students, as LCM-LoRA) the student
samples without CFG and distils the range's average guidance.

Deviations: real latents are the VAE posterior mean (the script samples the posterior); the guidance
embedding's new projection starts at zero (the script's is random), so the student starts as the teacher.

Flow teachers (SD3, FLUX: :class:`~diffdistill.schedule.FlowSchedule`, ``x_t = (1 - t) x0 + t eps``). The
grid, the step below, PCM's phase edges, TDD's candidates and LCM's boundary scalings all live in *grid
index* space, ``k = 0 .. T-1``, which ``schedule.index_time`` / ``time_index`` map to times: on a VP teacher
index ``k`` is diffusers timestep ``k`` (``t = (k + 1) / T``, so nothing changes there); on a flow teacher it
is the ``k``-th training sigma of diffusers' ``FlowMatchEulerDiscreteScheduler(shift)`` in ascending order,
``t = shift_t((k + 1) / T)`` -- index ``T - 1`` is ``t = 1``, index 0 is ``shift_t(1 / T)`` (0.003 at SD3's
shift 3), and the 50-point grid is those sigmas at indices 19, 39, ..., 999. LCM's ``c_skip(k)``,
``c_out(k)`` take the index, so ``f`` is the identity at index 0 on both families. The teacher's DDIM step
``alpha_m x0_T + sigma_m eps_T`` is, on the flow schedule, exactly the Euler step
``x_{t_n} + (t_m - t_n) v_T`` of the guided velocity, and the DDIM jumps of PCM and TDD
(:class:`JumpConsistency`) are ``x + (t_end - t) v_theta``. LCM on flow teachers has no reference
implementation (ours); PCM follows the official SD3 code (see :class:`PCM`), TDD the index-space rule of
its official FLUX script (see :class:`TDD`). With a resolution-dependent shift (FLUX), the grid is shifted
by the teacher's fixed ``exp(mu)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backbone import DiffusionBackbone
from ..config import ConfigError, _check
from ..schedule import FlowSchedule, to_x0_eps
from ..student import Student
from . import functional as fn
from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase


@dataclass
class LCMConfig(ObjectiveConfig):
    name: ClassVar[str] = "lcm"
    num_ddim_timesteps: int = 50   # teacher solver grid; the skipping interval is T / N timesteps
    w_min: float = 6.0             # teacher CFG ~ U[w_min, w_max] per sample, diffusers convention (1 = none)
    w_max: float = 16.0
    loss: str = "huber"            # huber | l2
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    target_decay: float = 0.95     # full students: EMA rate of the target network
    empty_prompt_prob: float = 0.0  # per sample, the caption is replaced by "" (student, teacher and target)

    def validate(self, p: str) -> None:
        _check(self.num_ddim_timesteps >= 1, f"{p}.num_ddim_timesteps", f"must be >= 1, got {self.num_ddim_timesteps}")
        _check(1.0 <= self.w_min <= self.w_max, f"{p}.w_min",
               f"need 1 <= w_min <= w_max (diffusers CFG scales), got {self.w_min}, {self.w_max}")
        _check(self.loss in ("huber", "l2"), f"{p}.loss", f"must be 'huber' or 'l2', got {self.loss!r}")
        _check(self.huber_c > 0, f"{p}.huber_c", f"must be positive, got {self.huber_c}")
        _check(self.timestep_scaling > 0 and self.sigma_data > 0, f"{p}.timestep_scaling",
               "timestep_scaling and sigma_data must be positive")
        _check(0.0 <= self.target_decay < 1.0, f"{p}.target_decay", f"must be in [0, 1), got {self.target_decay}")
        _check(0.0 <= self.empty_prompt_prob < 1.0, f"{p}.empty_prompt_prob",
               f"must be in [0, 1), got {self.empty_prompt_prob}")

    def trains_on_prompts(self) -> bool:
        return False  # captioned images

    def validate_run(self, config) -> None:
        self.check_images(config, "noises real images (an image folder or webdataset shards also do)")


class ConsistencyDistillation(Objective):
    """What LCM, TDD and PCM share: one student phase pulling the student's consistency function at
    ``(x_{t_n}, t_n)`` towards the target network's at the teacher's DDIM step ``(x_{t_m}, t_m)``.
    Subclasses choose the time pairs (:meth:`times`) and the consistency function (:meth:`consistency`).
    Times are chosen as grid indices (``grid_ks``) and mapped by the teacher schedule's ``index_time``: the
    diffusers timesteps on VP teachers, the flow scheduler's shifted training sigmas on flow teachers; the
    student's ``timesteps`` must lie on that grid."""

    def __init__(self, cfg, teacher, student: Student, prompt_pool: list[str]):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.target = None
        if student.adapter is None:  # full student: an EMA copy, not trained by any optimizer
            sb = student.backbone
            denoiser = copy.deepcopy(sb.denoiser).requires_grad_(False).eval()
            self.target = Student(DiffusionBackbone(denoiser, sb.schedule, sb.pred_type), None, student.timesteps)
        schedule = teacher.backbone.schedule
        T, N = schedule.num_train_timesteps, cfg.num_ddim_timesteps
        if T % N:
            raise ConfigError("objective.num_ddim_timesteps", f"must divide the teacher's {T} training timesteps, got {N}")
        self.skip = T // N
        # grid indices (schedule.index_time): 19, 39, ..., 999 -- diffusers timesteps on VP, the flow
        # scheduler's shifted training sigmas on flow
        self.grid_ks = torch.arange(1, N + 1, dtype=torch.float64) * self.skip - 1
        self._check_student_times()

    def _check_student_times(self) -> None:
        sched = self.teacher.backbone.schedule
        ks = sched.time_index(torch.tensor(self.student.timesteps, dtype=torch.float64))
        off = [float(k) for k in ks if not torch.isclose(self.grid_ks, k).any()]
        if off:
            what = "flow training-sigma indices" if isinstance(sched, FlowSchedule) else "diffusers timesteps"
            on_grid = [round(sched.index_time(k).item(), 6) for k in self.grid_ks.flip(0)[:3]]
            raise ConfigError("student.timesteps", f"{self.student.timesteps} include {what} {off} that are not on "
                              f"the {self.cfg.num_ddim_timesteps}-step training grid (indices {self.skip}(i+1) - 1, "
                              f"times {on_grid}, ...); the consistency function is trained only there")

    def phases(self) -> list[Phase]:
        return [Phase("student", ["student"])]

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return {"student": self.student.named_parameters_to_train()}

    # -- the target network ------------------------------------------------------------------------
    def target_net(self) -> Student:
        return self.student if self.target is None else self.target

    @torch.no_grad()
    def after_update(self, phase: str) -> None:
        if self.target is None or phase != "student":  # the student moved (PCM's disc phase leaves it as it is)
            return
        live = self.student.backbone.denoiser.parameters()
        for tp, p in zip(self.target.backbone.denoiser.parameters(), live):
            tp.lerp_(p.detach(), 1.0 - self.cfg.target_decay)

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.target is None:
            return {}
        return {f"target.{k}": v.detach() for k, v in self.target.backbone.denoiser.state_dict().items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.target is None:
            return super().load_extra_state(tensors)
        state = {k[len("target."):]: v for k, v in tensors.items() if k.startswith("target.")}
        if not state:  # never silently restart the target from the student
            raise ValueError("the checkpoint holds no consistency target network (objective.target.*)")
        self.target.backbone.denoiser.load_state_dict(state)

    # -- the parts subclasses choose -----------------------------------------------------------------
    def times(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t_n, t_m, t_end)``, each ``(B,)`` float64: the start time on the solver grid, the teacher's
        DDIM target one grid step below (grid index 0 at the bottom), and where the consistency function
        maps to (LCM: grid index 0)."""
        sched = self.teacher.backbone.schedule
        index = batch.randint(len(self.grid_ks))
        k_n = self.grid_ks[index]
        k_m = (k_n - self.skip).clamp_min(0)
        return sched.index_time(k_n), sched.index_time(k_m), sched.index_time(torch.zeros_like(k_n))

    def consistency(self, net: Student, x_t: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, cond) -> torch.Tensor:
        """LCM's ``f(x, t) = c_skip x + c_out x0_theta(x, t)`` (its end is always grid index 0), the scalings
        taken at ``t``'s grid index (the diffusers timestep on VP)."""
        k = self.teacher.backbone.schedule.time_index(t).to(x_t.device)
        c_skip, c_out = fn.lcm_boundary_scalings(k, self.cfg.sigma_data, self.cfg.timestep_scaling)
        c_skip, c_out = (c.to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1)) for c in (c_skip, c_out))
        return c_skip * x_t + c_out * net(x_t, t, cond, out="x0")

    def guidance(self, batch: Batch) -> torch.Tensor:
        """The teacher's CFG scale per sample, ``U[w_min, w_max]``."""
        return self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * batch.rand().double()

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, t_n: torch.Tensor, t_m: torch.Tensor, cond, w: torch.Tensor):
        """One DDIM step of the guided teacher from ``t_n`` to ``t_m``: ``alpha_m x0_T + sigma_m eps_T`` (on a
        flow schedule the Euler step ``x_t + (t_m - t_n) v_T``)."""
        tb = self.teacher.backbone
        with tb.adapter(None):
            pred = tb.cfg(x_t, t_n, cond, self.teacher.empty_cond(len(x_t)), w.to(x_t.device), out=tb.pred_type)
        x0, eps = to_x0_eps(pred, x_t, t_n, tb.pred_type, tb.schedule)
        return tb.schedule.add_noise(x0, eps, t_m)

    # -- the loss ----------------------------------------------------------------------------------
    def captions(self, batch: Batch) -> list[str]:
        """The batch's captions, each replaced by "" with probability ``empty_prompt_prob``."""
        return batch.drop_captions(batch.image_captions, self.cfg.empty_prompt_prob)

    def pair(self, batch: Batch, grad: bool = True):
        """``(online, target, t_end, cond)``: the student's consistency output from a noised real latent and the
        target's from the teacher's step below it, both at ``t_end``, and the captions' conditioning."""
        t = self.teacher
        with torch.no_grad():
            x0 = t.encode_images(batch.images, sample=False).to(t.dtype)  # (B, C, H, W) real latents
            cond = t.encode_captions(self.captions(batch))
        t_n, t_m, t_end = (s.to(x0.device) for s in self.times(batch))
        eps = batch.randn(*x0.shape[1:]).to(x0)
        x_n = t.backbone.schedule.add_noise(x0, eps, t_n)
        w = self.guidance(batch)
        cond_w = cond.with_guidance(w)  # a guidance-embedded student is told the teacher's scale (LCM sec. 4.3)
        with torch.set_grad_enabled(grad):
            online = self.consistency(self.student, x_n, t_n, t_end, cond_w)
        with torch.no_grad():
            x_m = self.teacher_step(x_n, t_n, t_m, cond, w)
            target = self.consistency(self.target_net(), x_m, t_m, t_end, cond_w)
        return online, target, t_end, cond

    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        if phase != "student":
            raise ValueError(f"{self.cfg.name} has one phase, 'student'; got {phase!r}")
        online, target, _, _ = self.pair(batch)
        loss = fn.consistency_loss(online, target, self.cfg.loss, self.cfg.huber_c)
        return LossOut(loss, {f"consistency_{self.cfg.loss}": loss.detach()}, images=online.detach())


class JumpConsistency(ConsistencyDistillation):
    """A consistency function that is a DDIM jump to an end time chosen per sample (PCM's phase edge, TDD's
    target timestep): ``f(x, t) = alpha(t_end) x0_theta + sigma(t_end) eps_theta``, and ``f(x, t_end) = x``."""

    def consistency(self, net: Student, x_t: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, cond) -> torch.Tensor:
        sched = net.backbone.schedule
        x0, eps = to_x0_eps(net(x_t, t, cond, out=net.backbone.pred_type), x_t, t, net.backbone.pred_type, sched)
        at_end = (t == t_end).view(-1, *[1] * (x_t.ndim - 1))
        return torch.where(at_end, x_t, sched.add_noise(x0, eps, t_end))


class LCM(ConsistencyDistillation):
    Config = LCMConfig


@dataclass
class PCMConfig(LCMConfig):
    name: ClassVar[str] = "pcm"
    num_phases: int = 4            # PCM's "multiphase": the ODE trajectory split into this many phases
    w_min: float = 5.0             # the official SD1.5 run's w in [4, 5] ("larger CFG: over-exposure"), +1
    w_max: float = 6.0
    adv_weight: float = 0.0        # > 0: PCM's adversarial consistency loss at this weight (official adv runs: 0.1)
    adv_lr: float | None = 1e-5    # its discriminator heads' learning rate (official --adv_lr)
    disc_levels: list[str] | None = None  # teacher feature levels with a head (None: the backbone's default)
    disc_head_width: int | None = None    # heads project wider features to this many channels first

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(1 <= self.num_phases <= self.num_ddim_timesteps, f"{p}.num_phases",
               f"must be in [1, num_ddim_timesteps], got {self.num_phases}")
        _check(self.adv_weight >= 0, f"{p}.adv_weight", f"must be >= 0, got {self.adv_weight}")
        _check(self.adv_lr is None or self.adv_lr > 0, f"{p}.adv_lr", f"must be positive, got {self.adv_lr}")
        _check(self.disc_head_width is None or self.disc_head_width > 0, f"{p}.disc_head_width",
               f"must be positive or null, got {self.disc_head_width}")


class PCM(JumpConsistency):
    """Phased Consistency Model (Wang et al. 2024, "Phased Consistency Model", sec. 3; official code
    G-U-N/Phased-Consistency-Model, read as the reference). The solver grid's indices are split into
    ``num_phases`` phases at ``E = floor(linspace(0, N, K, endpoint=False))``; phase ``j`` holds grid indices
    ``[E_j, E_{j+1})`` and its edge is the timestep just below it (``grid[E_j - 1]``, or 0). Within a phase
    the consistency function is the DDIM jump to the phase's edge (:class:`JumpConsistency`); the phase is
    that of the start time ``t_n`` for both the student and the target, and when the teacher's step lands on
    the edge the target is ``x_{t_m}`` itself. Sampling is deterministic DDIM from phase top to phase top
    (``student.gamma: 0``, e.g. diffusers 999, 739, 499, 239 for 4 phases), landing on timestep 0 (on a
    flow teacher: Euler steps from phase top to phase top, landing on ``t = 0``).

    Defaults: the official SD1.5 LoRA run (4 phases, w 4..5 in the form ``cond + w (cond - uncond)``,
    pseudo-Huber). Full students use an EMA target as LCM does; the official code (LoRA) uses the online one.

    Adversarial consistency loss (``adv_weight > 0``; the official ``*_adv.py`` scripts, SD3: every ``run.sh``
    command, 0.1): the student's output at its phase edge (fake) and the consistency target (real) are each moved
    forward by the noise process, with independent noise, to one grid level drawn from the edge up to one step
    below the phase's top; heads on the frozen teacher's features (adapters off, conditioned by the network on
    that level and the prompt) score them with the hinge loss, ``relu(1 + D(fake)) + relu(1 - D(real))``; the
    student adds ``adv_weight x relu(1 - D(fake))`` (through the frozen teacher) to its consistency loss; the heads
    train at ``adv_lr``. Deviations: the official scripts alternate a discriminator step and a generator step on
    different batches (1:1), ours run both phases every step on the same batch (half the steps give the same
    number of updates of each); the official SD3 re-noising ``((1 - s') x + (s' - s) eps) / (1 - s)`` adds less
    noise than the flow's own forward step, which ours takes (their SD1.5 script takes the exact one too); their
    heads are 1x1 convolutions on every block's tokens with a 64 x 64 patch-logit map, ours the shared
    :class:`~diffdistill.nets.discriminator.DiscriminatorHead` on the backbone's default levels
    (``disc_levels``, ``disc_head_width``).

    Flow teachers (SD3). Read for facts: the official ``code/text_to_image_sd3/`` (``train_pcm_lora_sd3.py``,
    ``train_pcm_lora_sd3_adv.py``, ``pcm_fm_deterministic_scheduler.py``, ``run.sh``, ``sd3_test.py``).
    Verified to match ours: the solver grid is the base's ``FlowMatchEulerDiscreteScheduler`` training
    sigmas reversed (``sigmas[::-1]``, index ``k`` -> ``shift_t((k + 1) / T)``, the shift of the model's own
    scheduler config: 3.0 for SD3 Medium) at indices ``T/N (i + 1) - 1``; the step below is the grid point
    below, and at the bottom index 0 (``sigmas[0] = shift_t(1/T)``, not sigma 0); start indices are uniform;
    the phase edges are ``floor(linspace(0, N, K, endpoint=False))`` with edge sigma ``grid[E_j - 1]`` or
    index 0, as ours; the student's and the target's consistency function is ``x + (sigma_edge - sigma) v``
    (the DDIM jump on the flow schedule), the target network is the online LoRA under ``no_grad``; the
    teacher's step is the Euler step ``x + (sigma_prev - sigma) v`` with ``cond + w (cond - uncond)``;
    pseudo-Huber with c = 0.001 (``run.sh``: ``--loss_type huber``); the transformer's timestep is
    ``1000 sigma``. Their runs (``run.sh``): ``num_euler_timesteps`` 100, ``multiphase`` 1 / 2 / 4. Their
    guidance is ``w = 3`` hard-coded in the training step (diffusers scale 4; the ``--w_min 4 --w_max 5``
    flags are parsed but unused). Sampling: ``PCMFMDeterministicScheduler`` Euler-steps over the same grid
    from phase top to phase top and appends sigma 0 -- diffusers' ``FlowMatchEulerDiscreteScheduler``
    with ``stochastic_sampling=False`` at those sigmas, which our export writes for ``gamma`` 0. Not
    followed or not verified: their latents are ``vae.encode(...).sample() * scaling_factor`` without
    SD3's ``shift_factor`` (ours subtract it, the inverse of SD3's pipeline decoding); the
    adversarial term (``adv_weight`` 0.1 in every ``run.sh`` command) follows with the deviations above; their LoRA also
    targets the context stream, the AdaLN norms and the embedders (``student.lora_targets`` can name them).
    Shift: training takes the base's scheduler config (shift 3 for SD3 Medium) and the training scripts'
    validation samples with ``PCMFMDeterministicScheduler(1000, 3.0, 100)``; ``sd3_test.py`` loads
    released deterministic LoRAs named ``..._4step_shift3`` (shift-3 scheduler) and ``..._2step_shift1`` /
    ``..._4step_shift1`` (shift-1 scheduler, ``pcm_timesteps`` 50). No script or flag in the repository
    trains with shift 1, so how the shift-1 LoRAs were made could not be verified.
    """

    Config = PCMConfig

    def __init__(self, cfg: PCMConfig, teacher, student: Student, prompt_pool: list[str]):
        super().__init__(cfg, teacher, student, prompt_pool)
        N, K = cfg.num_ddim_timesteps, cfg.num_phases
        self.edge_index = torch.linspace(0, N, K + 1, dtype=torch.float64)[:-1].floor().long()  # E_j
        self.adversary = None
        if cfg.adv_weight > 0:  # heads on the frozen teacher's features (adapters off), unconditioned
            from .gan import Adversary, DenoiserFeatures, latent_probe

            network = DenoiserFeatures(teacher.backbone, None, cfg.disc_levels)
            self.adversary = Adversary(network, latent_probe(teacher), loss="hinge", head_width=cfg.disc_head_width)

    def phases(self) -> list[Phase]:
        if self.adversary is None:
            return super().phases()
        return [Phase("student", ["student"]), Phase("disc", ["disc"], lr=self.cfg.adv_lr)]

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        groups = super().trainable()
        if self.adversary is not None:
            groups["disc"] = dict(self.adversary.heads.named_parameters())
        return groups

    def adversarial_level(self, batch: Batch, t_end: torch.Tensor) -> torch.Tensor:
        """``(B,)`` times: per sample a grid level drawn uniformly from its phase edge ``t_end`` up to one step below
        the phase's top (the official ``adv_index ~ randint(end_index, end_index + N // K)``, sigma
        ``sigmas_prev[adv_index]``)."""
        N, K = self.cfg.num_ddim_timesteps, self.cfg.num_phases
        sched = self.teacher.backbone.schedule
        edges = sched.index_time(self.phase_edges()).to(t_end)  # (K,) the phases' edge times, ascending
        phase = (t_end.view(-1, 1) == edges.view(1, -1)).double().argmax(dim=1).cpu()  # t_end is one of them
        index = self.edge_index[phase] + batch.randint(N // K)  # (B,) grid indices in [E_j, E_j + N / K)
        below = (index - 1).clamp_min(0)
        k = torch.where(index > 0, self.grid_ks[below], torch.zeros_like(self.grid_ks[below]))
        return sched.index_time(k).to(t_end)

    def adversarial_input(self, batch: Batch, x: torch.Tensor, t_end: torch.Tensor, t_adv: torch.Tensor):
        """``x`` (at its phase edge ``t_end``) moved forward by the noise process to ``t_adv``, with fresh noise:
        real and fake get independent draws at the same level."""
        eps = batch.randn(*x.shape[1:]).to(x)
        return self.teacher.backbone.schedule.transition(x, t_end, t_adv, eps)

    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        if self.adversary is None:
            return super().loss(phase, batch, step)
        if phase not in ("student", "disc"):
            raise ValueError(f"pcm with adv_weight > 0 has phases 'student' and 'disc'; got {phase!r}")
        online, target, t_end, cond = self.pair(batch, grad=phase == "student")
        t_adv = self.adversarial_level(batch, t_end)
        fake = self.adversarial_input(batch, online, t_end, t_adv)
        if phase == "disc":
            with torch.no_grad():
                real = self.adversarial_input(batch, target, t_end, t_adv)
            logits_real = self.adversary.head_logits(real, t_adv, cond)
            logits_fake = self.adversary.head_logits(fake.detach(), t_adv, cond)
            d = fn.hinge_discriminator_loss(logits_real, logits_fake)
            return LossOut(d, {"gan_discriminator": d.detach(), "logits_real": logits_real.detach().mean(),
                               "logits_fake": logits_fake.detach().mean()}, images=online.detach())
        consistency = fn.consistency_loss(online, target, self.cfg.loss, self.cfg.huber_c)
        g = fn.hinge_margin_generator_loss(self.adversary.head_logits(fake, t_adv, cond))
        return LossOut(consistency + self.cfg.adv_weight * g, {f"consistency_{self.cfg.loss}": consistency.detach(),
                                                               "gan_generator": g.detach()}, images=online.detach())

    def phase_edges(self) -> torch.Tensor:
        """The edge grid index of each phase, ascending (0, then ``grid[E_j - 1]``)."""
        shifted = (self.edge_index - 1).clamp_min(0)
        return torch.where(self.edge_index > 0, self.grid_ks[shifted], torch.zeros_like(self.grid_ks[shifted]))

    def times(self, batch: Batch):
        sched = self.teacher.backbone.schedule
        index = batch.randint(len(self.grid_ks))
        k_n = self.grid_ks[index]
        k_m = (k_n - self.skip).clamp_min(0)
        phase = torch.searchsorted(self.edge_index, index, right=True) - 1
        return sched.index_time(k_n), sched.index_time(k_m), sched.index_time(self.phase_edges()[phase])


@dataclass
class TDDConfig(LCMConfig):
    name: ClassVar[str] = "tdd"
    min_steps: int = 4             # candidate inference schedules: equidistant min_steps..max_steps on the grid
    max_steps: int = 8
    window: int = 260              # target timesteps drawn among candidates within this many timesteps
    s_ratio: float = 0.3           # then shrunk to floor((1 - U s_ratio) s0): training for gamma-sampling
    w_min: float = 4.5             # fixed w 3.5 in the form cond + w (cond - uncond), +1
    w_max: float = 4.5
    empty_prompt_prob: float = 0.2  # decoupled guidance (the official SDXL run)

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(1 <= self.min_steps <= self.max_steps <= self.num_ddim_timesteps, f"{p}.min_steps",
               f"need 1 <= min_steps <= max_steps <= num_ddim_timesteps, got {self.min_steps}, {self.max_steps}")
        _check(self.window >= 0, f"{p}.window", f"must be >= 0, got {self.window}")
        _check(0.0 <= self.s_ratio < 1.0, f"{p}.s_ratio", f"must be in [0, 1), got {self.s_ratio}")


class TDD(JumpConsistency):
    """Target-Driven Distillation (Wang et al. 2024, "Target-Driven Distillation: Consistency Distillation
    with Target Timestep Selection and Decoupled Guidance"; official code RedAIGC/Target-Driven-Distillation,
    read as the reference).

    * Target timestep selection: the candidates are the union of the equidistant ``min_steps`` ..
      ``max_steps``-step inference schedules on the solver grid (LCMScheduler's rule), with 0 added and the
      top (999) left out. For the teacher's DDIM target ``k_m``, ``m`` is the largest candidate <= ``k_m``;
      ``s0`` is drawn uniformly among the candidates in ``[m - window, m]`` and shrunk to
      ``s = floor((1 - U s_ratio) s0)``, which trains the student for gamma-sampling. Student and target
      both jump by DDIM to ``s`` (:class:`JumpConsistency`).
    * Decoupled guidance: with probability ``empty_prompt_prob`` a caption is replaced by "" for the
      student, the teacher and the target alike, so that those samples learn the unguided flow and CFG can
      be tuned at inference (``student.guidance``).
    * Sampling: gamma-sampling (``student.gamma`` 0.2, TDD's ``eta``) on the LCM grid; non-equidistant
      schedules (TDD's ``special_jump``, e.g. diffusers 999, 879, 759, 499, 259) are plain
      ``student.timesteps``.

    Deviations: TDD's scheduler ends on a clean sample (alpha = 1) where ours, like diffusers' TCD, ends on
    timestep 0 (alpha_bar 0.99915 on SD); its inference-time x0 clipping is not implemented; full students
    use an EMA target as LCM does (the official code trains LoRA with the online one).

    Flow teachers: the official FLUX script (``train/FLUX/train_tdd.py``, read for facts) runs the same
    rule in index space over the scheduler's training sigmas (``sigmas[::-1]``: candidates, window 260 and
    the ``floor`` shrink on indices, the jump ``x + (sigma_s - sigma) v``), as ours does (it looks ``m`` up
    from ``1000 sigma_prev``, which on its unshifted sigmas is ``k_m + 1``, where ours uses ``k_m``). Its FLUX
    scheduler shifts dynamically, so its training sigmas are unshifted, where our FLUX grid carries the
    teacher's fixed resolution shift; on SD3 (fixed shift) the two agree. Sampling on flow: the same
    index rule, ``s = floor((1 - gamma) k_next)``, then fresh noise up to the next time; the last step
    lands on ``t = 0``. No stock flow scheduler runs ``0 < gamma < 1``, so such students do not export.
    """

    Config = TDDConfig

    def __init__(self, cfg: TDDConfig, teacher, student: Student, prompt_pool: list[str]):
        super().__init__(cfg, teacher, student, prompt_pool)
        self.candidates = self.candidate_timesteps()

    def candidate_timesteps(self) -> torch.Tensor:
        N, top_down = len(self.grid_ks), self.grid_ks.flip(0)
        picks = [top_down[torch.linspace(0, N, n + 1, dtype=torch.float64)[:-1].floor().long()]
                 for n in range(self.cfg.min_steps, self.cfg.max_steps + 1)]
        union = torch.unique(torch.cat(picks))  # ascending
        return torch.cat([torch.zeros(1, dtype=torch.float64), union[:-1]])

    def target_timestep(self, k_m: torch.Tensor, batch: Batch) -> torch.Tensor:
        """TDD's ``s`` for each teacher target ``k_m`` (``(B,)`` grid indices: diffusers timesteps on VP)."""
        c = self.candidates
        m = c[torch.searchsorted(c, k_m, right=True) - 1]  # the largest candidate <= k_m
        u_pick, u_shrink = batch.rand().double(), batch.rand().double()
        s = torch.empty_like(k_m)
        for i in range(len(k_m)):
            inside = c[(c >= (m[i] - self.cfg.window).clamp_min(0)) & (c <= m[i])]
            s0 = inside[min(int(u_pick[i] * len(inside)), len(inside) - 1)]
            s[i] = torch.floor((1 - u_shrink[i] * self.cfg.s_ratio) * s0)
        return s

    def times(self, batch: Batch):
        sched = self.teacher.backbone.schedule
        k_n = self.grid_ks[batch.randint(len(self.grid_ks))]
        k_m = (k_n - self.skip).clamp_min(0)
        return sched.index_time(k_n), sched.index_time(k_m), sched.index_time(self.target_timestep(k_m, batch))
