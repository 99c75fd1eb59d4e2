"""Regression on teacher ODE pairs: knowledge distillation (Luhman & Luhman 2021, "Knowledge
Distillation in Iterative Generative Models for Improved Sampling Speed", eq. 4), also the
regression term of DMD (Yin et al. 2024, eq. 9).

For noise ``z`` and prompt ``c`` the teacher's deterministic ODE solver (DDIM, ``teacher_steps``
steps, CFG ``guidance``) gives ``x0_T(z, c)``. The one-step student is trained with
``L = d(G(z, c), x0_T(z, c))`` (eq. 4). Multi-step students see, at their later times ``t_i``, the
teacher sample re-noised with fresh noise -- exactly the input their few-step sampler gives them --
and regress onto the same target. With fresh noise that target is not a function of the input: the
loss is minimised by the posterior mean ``E[x0 | x_t]``, which is blurred at large ``t``. ``steps:
first`` trains only the first step on the pairs (the noise-to-image map of eq. 4 / DMD eq. 9); the
``dmd2`` objective exposes it as ``objective.regression_steps``.

Deviation: ``d`` is the squared error in latent space. Luhman & Luhman use L2 in pixel space on
CIFAR; DMD uses LPIPS on decoded images, whose VGG weights must be downloaded (not possible
offline). Pairs are generated on the fly, or, with ``num_pairs > 0``, once into
``<run>/teacher_pairs.safetensors`` and sampled from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import _check
from ..sampling import sample_ode
from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase


@dataclass
class RegressionConfig(ObjectiveConfig):
    name: ClassVar[str] = "regression"
    teacher_steps: int = 25
    guidance: float = 2.0        # teacher CFG, diffusers convention (1 = none)
    num_pairs: int = 0           # 0: pairs on the fly; N: N cached pairs per run
    pair_batch_size: int = 100
    steps: str = "all"           # all: every student step (later ones on re-noised pairs) | first: step 0 only

    def validate_run(self, config) -> None:
        self.check_renoising_sampler(config, "trains later steps on teacher samples re-noised with fresh noise")

    def validate(self, p: str) -> None:
        _check(self.teacher_steps > 0, f"{p}.teacher_steps", f"must be positive, got {self.teacher_steps}")
        _check(self.guidance >= 1.0, f"{p}.guidance", f"is a diffusers CFG scale, must be >= 1, got {self.guidance}")
        _check(self.num_pairs >= 0, f"{p}.num_pairs", f"must be >= 0, got {self.num_pairs}")
        _check(self.steps in ("all", "first"), f"{p}.steps", f"must be 'all' or 'first', got {self.steps!r}")
        _check(self.pair_batch_size > 0, f"{p}.pair_batch_size", f"must be positive, got {self.pair_batch_size}")


class Regression(Objective):
    Config = RegressionConfig

    def __init__(self, cfg: RegressionConfig, teacher, student, prompt_pool: list[str]):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.prompt_pool = prompt_pool
        self.pairs: dict[str, torch.Tensor] | None = None

    def phases(self) -> list[Phase]:
        return [Phase("student", ["student"])]

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return {"student": self.student.named_parameters_to_train()}

    @torch.no_grad()
    def teacher_pairs(self, prompts: list[str], z: torch.Tensor) -> torch.Tensor:
        """The teacher's DDIM sample (latents) from noise ``z`` for ``prompts``."""
        from ..pipeline import sampling_grid

        t = self.teacher
        uncond = t.empty_cond(len(prompts)) if self.cfg.guidance != 1.0 else None
        with t.backbone.adapter(None):
            x0 = sample_ode(t.backbone, z, t.encode_prompt(prompts), sampling_grid(t, self.cfg.teacher_steps),
                            uncond=uncond, guidance=self.cfg.guidance)
        return x0

    def prepare(self, run_dir, device) -> None:
        if self.cfg.num_pairs == 0:
            return
        from ..checkpoint import load_state, save_state

        path = Path(run_dir) / "teacher_pairs.safetensors"
        if path.is_file():
            tensors, meta = load_state(path)
            if meta.get("num_pairs") == self.cfg.num_pairs:
                self.pairs = tensors
                return
        g = torch.Generator().manual_seed(12345)
        idx = torch.randint(len(self.prompt_pool), (self.cfg.num_pairs,), generator=g)
        prompts = [self.prompt_pool[i] for i in idx.tolist()]
        zs, x0s = [], []
        for i in tqdm(range(0, len(prompts), self.cfg.pair_batch_size), desc="teacher pairs"):
            chunk = prompts[i:i + self.cfg.pair_batch_size]
            z = torch.randn((len(chunk), *self.teacher.latent_shape), generator=g).to(device, self.teacher.dtype)
            x0 = self.teacher_pairs(chunk, z)
            zs.append(z.cpu()), x0s.append(x0.cpu())
        self.pairs = {"z": torch.cat(zs), "x0": torch.cat(x0s), "prompt_index": idx}
        save_state(path, self.pairs, {"num_pairs": self.cfg.num_pairs, "prompts": "index into the run's prompt pool"})

    def batch_pairs(self, batch: Batch):
        if self.pairs is None:
            z = batch.randn(*self.teacher.latent_shape, device=self.teacher.device, dtype=self.teacher.dtype)
            return batch.prompts, z, self.teacher_pairs(batch.prompts, z)
        pick = batch.randint(len(self.pairs["z"]))
        prompts = [self.prompt_pool[i] for i in self.pairs["prompt_index"][pick].tolist()]
        device = self.teacher.device
        return prompts, self.pairs["z"][pick].to(device), self.pairs["x0"][pick].to(device)

    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        if phase != "student":
            raise ValueError(f"regression has one phase, 'student'; got {phase!r}")
        prompts, z, x0 = self.batch_pairs(batch)
        ts = self.student.timesteps
        k = batch.randint(len(ts) if self.cfg.steps == "all" else 1)
        t = torch.tensor(ts, dtype=torch.float64)[k]
        eps = batch.randn(*z.shape[1:]).to(z)
        renoised = self.student.backbone.schedule.add_noise(x0, eps, t)
        x_in = torch.where((k == 0).view(-1, 1, 1, 1).to(z.device), z, renoised)  # (B, C, H, W)
        pred = self.student(x_in, t.to(z.device), self.teacher.encode_prompt(prompts), out="x0")
        mse = F.mse_loss(pred.float(), x0.float())
        return LossOut(total=mse, terms={"regression_mse": mse.detach()}, images=pred.detach())
