"""Inference speed of a teacher-like model, split into its three parts: text encoding, the denoiser
(all sampling steps) and the VAE decode.

Each part is timed on its own (the device synchronised around it) after ``warmup`` untimed runs of the
whole pipeline; the reported figure is the median over ``repeats``. NFE is counted, not assumed: a
forward hook on the denoiser counts the calls and the rows each call evaluates, so a classifier-free
guided step, one call on the batch ``[uncond, cond]``, counts 2 NFE per image (the convention of
DMD2, LCM and most step-distillation papers). Speed is a benchmark, never a test assertion.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..sampling import sample_ode


@dataclass
class SpeedReport:
    batch_size: int
    repeats: int
    nfe: float  # denoiser evaluations per image (CFG counts both branches)
    denoiser_calls: int  # forward calls of the denoiser per batch
    ms_text: float  # per image, median over repeats
    ms_denoiser: float
    ms_vae_decode: float
    device: str
    dtype: str

    @property
    def ms_per_image(self) -> float:
        return self.ms_text + self.ms_denoiser + self.ms_vae_decode

    @property
    def images_per_second(self) -> float:
        return 1000.0 / self.ms_per_image

    def to_dict(self) -> dict:
        return {**asdict(self), "ms_per_image": self.ms_per_image, "images_per_second": self.images_per_second}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CountRows:
    """Forward hook counting calls and evaluated rows (the batch dimension of the first input)."""

    def __init__(self):
        self.calls, self.rows = 0, 0

    def __call__(self, _module, args, _output):
        self.calls += 1
        self.rows += int(args[0].shape[0])


@torch.no_grad()
def measure_speed(teacher, prompts: Sequence[str], *, num_steps: int = 25, ts=None, guidance: float = 1.0,
                  sampler: Callable = sample_ode, warmup: int = 1, repeats: int = 5, seed: int = 0) -> SpeedReport:
    """Time ``teacher`` (a :class:`~diffdistill.pipeline.Teacher` or anything with its ``encode_prompt``,
    ``empty_cond``, ``decode_latents``, ``backbone``, ``latent_shape``, ``device``, ``dtype``) at batch
    ``len(prompts)``. ``sampler`` is :func:`~diffdistill.sampling.sample_ode` (default, over the teacher's
    own grid of ``num_steps``) or :func:`~diffdistill.sampling.sample_student`; ``ts`` overrides the grid."""
    from ..pipeline import sampling_grid

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    prompts = list(prompts)
    B = len(prompts)
    ts = sampling_grid(teacher, num_steps) if ts is None else ts
    noise = torch.randn((B, *teacher.latent_shape), generator=torch.Generator().manual_seed(seed))
    noise = noise.to(teacher.device, teacher.dtype)
    device = teacher.device

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - start

    def run():
        (cond, uncond), t_text = timed(lambda: (teacher.encode_prompt(prompts),
                                                teacher.empty_cond(B) if guidance != 1.0 and
                                                not teacher.backbone.embeds_guidance else None))
        latents, t_den = timed(lambda: sampler(teacher.backbone, noise, cond, ts, uncond=uncond, guidance=guidance))
        _, t_vae = timed(lambda: teacher.decode_latents(latents))
        return t_text, t_den, t_vae

    for _ in range(warmup):
        run()
    counter = _CountRows()
    handle = teacher.backbone.denoiser.register_forward_hook(counter)
    try:
        times = [run() for _ in range(repeats)]
    finally:
        handle.remove()
    ms = [1000 * statistics.median(part) / B for part in zip(*times)]
    return SpeedReport(batch_size=B, repeats=repeats, nfe=counter.rows / (B * repeats),
                       denoiser_calls=counter.calls // repeats, ms_text=ms[0], ms_denoiser=ms[1],
                       ms_vae_decode=ms[2], device=str(device), dtype=str(teacher.dtype).replace("torch.", ""))
