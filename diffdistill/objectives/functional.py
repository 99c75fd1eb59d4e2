"""Pure maths of the objectives, on tensors (no models): testable on their own.

Distribution matching (Yin et al., "One-step Diffusion with Distribution Matching Distillation",
CVPR 2024 -- DMD -- and "Improved Distribution Matching Distillation for Fast Image Synthesis",
NeurIPS 2024 -- DMD2) and the non-saturating GAN losses (Goodfellow et al. 2014) DMD2 adds; variational
score distillation (Wang et al., "ProlificDreamer", NeurIPS 2023; SwiftBrush, Nguyen & Tran, CVPR 2024);
consistency distillation (LCM, PCM, TDD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching gradient on the generator output ``x`` (DMD eq. 7-8): the difference
    of the fake and real scores, written with x0 predictions at a noised copy of ``x``,
    ``(x - x0_real) - (x - x0_fake) = x0_fake - x0_real``, divided per sample by the mean absolute
    ``x - x0_real`` (DMD eq. 8's weighting ``w_t``, which makes the step size uniform over t). Gradient
    *descent* on ``x`` with this moves it from where the fake score points towards where the real one
    does. ``(B, ...)`` in, ``(B, ...)`` out, computed in float64 like the authors' code."""
    x, x0_real, x0_fake = x.double(), x0_real.double(), x0_fake.double()
    p_real, p_fake = x - x0_real, x - x0_fake
    dims = tuple(range(1, x.ndim))
    return (p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True)


def score_surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The surrogate whose gradient w.r.t. ``x`` is ``grad / x.numel()``: ``0.5 * mean((x - sg(x - grad))^2)``."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().double() - grad.detach()).float())


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """The variational score distillation gradient on the generator output (ProlificDreamer eq. 9, as SwiftBrush
    uses it): ``w(t) (eps_real - eps_fake)``, the pretrained (guided) minus the fake score's noise prediction
    at the noised output, weighted per sample by ``w(t) = sigma_t^2 = 1 - alpha_bar_t`` (``sigma2``, ``(B,)``)
    as both papers' code does; no further normalisation. In x0 terms this is
    ``sigma_t^2 alpha_t / sigma_t (x0_fake - x0_real)``: DMD's direction under another weighting. float64."""
    w = sigma2.double().reshape(-1, *([1] * (eps_real.ndim - 1)))
    return w * (eps_real.double() - eps_fake.double())


def denoising_loss(pred_eps: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fake score's denoising score matching loss (DMD eq. 6), in epsilon space as in DMD2's code:
    ``mean((pred_eps - eps)^2)``, each sample's squared error times ``weight`` ``(B,)`` when given
    (SwiftBrush's LoRA teacher: ``alpha_bar_t``, its code's ``mse(sqrt(a) pred, sqrt(a) eps)``)."""
    if weight is None:
        return F.mse_loss(pred_eps.float(), eps.float())
    sq = (pred_eps.float() - eps.float()).pow(2)
    return (weight.float().reshape(-1, *([1] * (sq.ndim - 1))) * sq).mean()


def ddim_secant_x0(x_start: torch.Tensor, a_start, s_start, z: torch.Tensor, a_k, s_k) -> torch.Tensor:
    """The clean prediction whose deterministic DDIM step from ``x_start`` (at ``alpha, sigma = a_start,
    s_start``) lands exactly on ``z`` (at ``a_k, s_k``): DDIM keeps ``eps = (x_start - a_start x0) / s_start``
    and moves to ``a_k x0 + s_k eps``, so ``x0 = (z - (s_k / s_start) x_start) / (a_k - s_k a_start / s_start)``.
    The VP form of DP-DMD's first-step target, the secant velocity ``(x1 - z) / (1 - sigma_k)`` of a flow
    model's straight path from noise through the teacher's anchor ``z``. Coefficients: numbers or ``(B,)``."""
    def col(c):
        c = torch.as_tensor(c, dtype=torch.float64, device=z.device)
        return c.reshape(-1, *([1] * (z.ndim - 1))) if c.ndim else c
    a0, s0, ak, sk = col(a_start), col(s_start), col(a_k), col(s_k)
    return (z.double() - (sk / s0) * x_start.double()) / (ak - sk * a0 / s0)


def add_distillation_loss(x: torch.Tensor, x0_teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ADD's distillation loss (Sauer et al. 2023, eq. 4-5): ``c(t) ||x - x0_teacher||^2`` with ``x0_teacher``
    the teacher's (constant) clean prediction at a noised copy of the student's output ``x``, ``weight`` the
    per-sample ``c(t)`` ``(B,)``; squared error averaged over elements and the batch."""
    sq = (x.float() - x0_teacher.detach().float()).pow(2)
    return (weight.float().reshape(-1, *([1] * (sq.ndim - 1))) * sq).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``E[softplus(-D(G(z)))]`` (DMD2 eq. 5's generator side)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``E[softplus(-D(x_real))] + E[softplus(D(G(z)))]``: real labelled 1, generated 0 (DMD2 eq. 5)."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The hinge GAN's generator loss ``-E[D(G(z))]`` (Lim & Ye 2017; ADD eq. 3 and LADD use the hinge GAN)."""
    return -logits_fake.float().mean()


def hinge_margin_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``E[max(0, 1 - D(G(z)))]``: the generator side of PCM's adversarial consistency loss (its official
    ``discriminator_sd3.py`` / ``_sd15.py`` ``g_loss``), which stops pushing once a logit passes 1."""
    return F.relu(1 - logits_fake.float()).mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``E[max(0, 1 - D(x_real))] + E[max(0, 1 + D(G(z)))]``: the hinge GAN's discriminator loss."""
    return F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean()


def r1_penalty(logits_real: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ``E ||grad_x sum_heads D(x)||^2`` over real inputs ``x`` (which must require
    grad and have produced ``logits_real``); differentiable (double backward) so it can be minimised."""
    (grad,) = torch.autograd.grad(logits_real.float().sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()


def approx_r1_penalty(logits_real: torch.Tensor, logits_perturbed: torch.Tensor) -> torch.Tensor:
    """Approximated R1 (Lin et al. 2025, "Diffusion Adversarial Post-Training for One-Step Video Generation"):
    ``E ||D(x) - D(x + sigma n)||^2``, the discriminator's change under a small Gaussian perturbation of its
    real input -- R1's smoothness pressure without a double backward through the feature network."""
    return (logits_real.float() - logits_perturbed.float()).pow(2).mean()


# -- consistency distillation (LCM, TDD, PCM) ---------------------------------------------------------
def lcm_boundary_scalings(timestep: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """The consistency boundary scalings ``(c_skip, c_out)`` of LCM (Luo et al. 2023, sec. 4.2, after Song
    et al. 2023's eq. 7 with ``sigma_min`` taken as 0): with ``s = timestep_scaling * timestep`` (the diffusers
    integer timestep, as LCM's code and ``LCMScheduler`` use it),
    ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)`` and ``c_out = s / sqrt(s^2 + sigma_data^2)``, so
    ``c_skip(0) = 1`` and ``c_out(0) = 0``: the consistency function is the identity at timestep 0."""
    s = timestep_scaling * timestep.double()
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / (s ** 2 + sigma_data ** 2).sqrt()


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 1e-3):
    """The distance between the online consistency output and the target's: ``l2`` (mean squared error) or
    ``huber``, the pseudo-Huber ``mean(sqrt((pred - target)^2 + c^2) - c)`` used by LCM's and PCM's code
    (Song & Dhariwal 2023's improved consistency training)."""
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.pow(2).mean()
    if kind == "huber":
        return ((diff.pow(2) + huber_c ** 2).sqrt() - huber_c).mean()
    raise ValueError(f"unknown consistency loss {kind!r}; choose 'l2' or 'huber'")
