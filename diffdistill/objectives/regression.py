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

``d`` (``loss``): ``mse``, the squared error in latent space (ours; Luhman & Luhman use L2 in pixel space on
CIFAR), or ``lpips``, LPIPS between the two latents decoded by the teacher's VAE, as DMD (eq. 9) and DMD2's SDXL
ODE pre-training (:mod:`diffdistill.perceptual`: weights from ``lpips_weights``, a safetensors file). Pairs are generated on the fly, or, with ``num_pairs > 0``, once into a :class:`PairPool` on disk
(``<run>/teacher_pairs/``) and streamed from there.
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
    pair_batch_size: int = 100  # pairs per teacher batch, and per shard of the pool on disk
    steps: str = "all"           # all: every student step (later ones on re-noised pairs) | first: step 0 only
    loss: str = "mse"            # mse (latents) | lpips (decoded images; DMD, DMD2's SDXL pre-training)
    lpips_weights: str | None = None  # loss lpips: the safetensors file of lpips.LPIPS(net="vgg") (perceptual.py)

    def validate_run(self, config) -> None:
        self.check_renoising_sampler(config, "trains later steps on teacher samples re-noised with fresh noise")

    def validate(self, p: str) -> None:
        _check(self.teacher_steps > 0, f"{p}.teacher_steps", f"must be positive, got {self.teacher_steps}")
        _check(self.guidance >= 1.0, f"{p}.guidance", f"is a diffusers CFG scale, must be >= 1, got {self.guidance}")
        _check(self.num_pairs >= 0, f"{p}.num_pairs", f"must be >= 0, got {self.num_pairs}")
        _check(self.steps in ("all", "first"), f"{p}.steps", f"must be 'all' or 'first', got {self.steps!r}")
        _check(self.pair_batch_size > 0, f"{p}.pair_batch_size", f"must be positive, got {self.pair_batch_size}")
        _check(self.loss in ("mse", "lpips"), f"{p}.loss", f"must be mse or lpips, got {self.loss!r}")


class Regression(Objective):
    Config = RegressionConfig

    def __init__(self, cfg: RegressionConfig, teacher, student, prompt_pool: list[str]):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.prompt_pool = prompt_pool
        self.pairs: PairPool | None = None
        self.lpips = None
        if cfg.loss == "lpips":
            from ..perceptual import load_lpips

            self.lpips = load_lpips(cfg.lpips_weights, teacher.device)

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
        import hashlib

        t = self.teacher  # everything that determines the pairs: a change of any remakes the pool
        recipe = {"num_pairs": self.cfg.num_pairs, "teacher_steps": self.cfg.teacher_steps,
                  "guidance": self.cfg.guidance, "teacher": t.source, "vae": t.vae_source, "dtype": str(t.dtype),
                  "latent_shape": list(t.latent_shape), "seed": 12345,
                  "prompts": hashlib.sha256("\n".join(self.prompt_pool).encode()).hexdigest()}
        self.pairs = PairPool.open_or_make(Path(run_dir) / "teacher_pairs", recipe, self.cfg.pair_batch_size,
                                           self.make_shard, device)

    def make_shard(self, shard: int, size: int, device) -> dict[str, torch.Tensor]:
        """Pairs ``shard * size ..`` of the pool: prompt indices and noise from a per-shard seed (so a pool
        whose making was interrupted goes on from its last complete shard), and the teacher's samples."""
        g = torch.Generator().manual_seed(12345 + shard)
        idx = torch.randint(len(self.prompt_pool), (size,), generator=g)
        z = torch.randn((size, *self.teacher.latent_shape), generator=g).to(device, self.teacher.dtype)
        x0 = self.teacher_pairs([self.prompt_pool[i] for i in idx.tolist()], z)
        return {"z": z.cpu(), "x0": x0.cpu(), "prompt_index": idx}

    def batch_pairs(self, batch: Batch):
        if self.pairs is None:
            z = batch.randn(*self.teacher.latent_shape, device=self.teacher.device, dtype=self.teacher.dtype)
            return batch.prompts, z, self.teacher_pairs(batch.prompts, z)
        pick = batch.randint(len(self.pairs))
        rows = self.pairs.rows(pick.tolist())
        prompts = [self.prompt_pool[i] for i in rows["prompt_index"].tolist()]
        device = self.teacher.device
        return prompts, rows["z"].to(device), rows["x0"].to(device)

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
        if self.lpips is None:
            mse = F.mse_loss(pred.float(), x0.float())
            return LossOut(total=mse, terms={"regression_mse": mse.detach()}, images=pred.detach())
        images = self.teacher.decode_latents(torch.cat([pred, x0.to(pred)])).float()  # (2B, 3, H, W) in ~[-1, 1]
        n = len(pred)
        d = self.lpips(images[:n], images[n:]).mean()
        return LossOut(total=d, terms={"regression_lpips": d.detach()}, images=pred.detach())


class PairPool:
    """Teacher pairs on disk, made once and streamed: ``shard-NNNNN.safetensors`` files of ``shard_size`` pairs
    (``z``, ``x0``, ``prompt_index``) and a ``COMPLETE`` marker holding the recipe that made them. Reading maps the
    files (safetensors), so a pool of tens of GB is not held in memory, and the processes of one machine share
    its pages. Made by the main process (the trainer runs ``prepare`` there first), shard by shard, each written
    atomically: an interrupted making resumes at its first missing shard; a pool made with another recipe is
    made anew."""

    MARKER = "COMPLETE"

    def __init__(self, folder: Path, num_pairs: int, shard_size: int):
        self.folder, self.num_pairs, self.shard_size = Path(folder), num_pairs, shard_size

    def __len__(self) -> int:
        return self.num_pairs

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    @classmethod
    def open_or_make(cls, folder: Path, recipe: dict, shard_size: int, make_shard, device) -> PairPool:
        """The pool in ``folder`` if it was made with ``recipe``, else made now with ``make_shard(i, n, device)``."""
        import json
        import shutil

        from ..checkpoint import save_state

        folder = Path(folder)
        marker = folder / cls.MARKER
        if marker.is_file():
            made = json.loads(marker.read_text())
            if made["recipe"] == recipe:
                return cls(folder, recipe["num_pairs"], made["shard_size"])
            shutil.rmtree(folder)  # another recipe's pairs: none of them can be reused
        partial = folder / "recipe.json"
        if partial.is_file() and json.loads(partial.read_text()) != {"recipe": recipe, "shard_size": shard_size}:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"recipe": recipe, "shard_size": shard_size}))
        pool = cls(folder, recipe["num_pairs"], shard_size)
        shards = -(-pool.num_pairs // shard_size)
        for shard in tqdm(range(shards), desc="teacher pairs"):
            if pool.shard_path(shard).is_file():
                continue
            size = min(shard_size, pool.num_pairs - shard * shard_size)
            save_state(pool.shard_path(shard), make_shard(shard, size, device), {"shard": shard, "size": size})
        marker.write_text(json.dumps({"recipe": recipe, "shard_size": shard_size}))
        return pool

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pairs ``indices`` (in that order), read from their shards."""
        from safetensors import safe_open

        by_shard: dict[int, list[int]] = {}
        for i in indices:
            if not 0 <= i < self.num_pairs:
                raise IndexError(f"pair {i} of a pool of {self.num_pairs}")
            by_shard.setdefault(i // self.shard_size, []).append(i)
        out: dict[int, dict[str, torch.Tensor]] = {}
        for shard, members in by_shard.items():
            with safe_open(str(self.shard_path(shard)), framework="pt") as f:
                for key in ("z", "x0", "prompt_index"):
                    rows = f.get_slice(key)
                    for i in members:
                        j = i - shard * self.shard_size
                        out.setdefault(i, {})[key] = rows[j:j + 1][0]
        return {key: torch.stack([out[i][key] for i in indices]) for key in ("z", "x0", "prompt_index")}
