"""Loading, prompt encoding and the VAE for diffusers text-to-image pipelines.

This module is the only place where diffusers' own vocabulary appears (``epsilon``,
``v_prediction``, ``model_index.json``, scheduler configs); everything it hands out speaks
diffdistill's: continuous ``t``, :class:`~diffdistill.backbone.Cond`, prediction types
``x0 | eps | v | flow``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbone import Cond, DiffusionBackbone
from .schedule import VPSchedule

# diffusers' prediction_type -> ours
PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


class TeacherLoadError(ValueError):
    """The teacher path or its contents are not something diffdistill can load."""


@dataclass
class Teacher:
    """A loaded text-to-image teacher: its components and a :class:`DiffusionBackbone` over its denoiser."""

    backbone: DiffusionBackbone
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    source: str
    pipeline_class: str
    _empty: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.denoiser.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the denoiser's native latents."""
        cfg = self.backbone.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def image_size(self) -> int:
        """Side of the images the VAE decodes the native latents to."""
        return self.latent_shape[-1] * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> Cond:
        """Prompt embeddings exactly as ``StableDiffusionPipeline.encode_prompt`` computes them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
            raise TypeError("encode_prompt expects a string or a non-empty list of strings")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = tok.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        embeds = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return Cond(embeds.to(dtype=self.dtype, device=self.device))

    def empty_cond(self, batch_size: int = 1) -> Cond:
        """The empty-prompt embedding used as the unconditional branch of CFG (cached)."""
        if "cond" not in self._empty:
            self._empty["cond"] = self.encode_prompt([""])
        return self._empty["cond"].expand(batch_size)

    # -- VAE -----------------------------------------------------------------------------------
    @property
    def _scale_shift(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """Images in ``[-1, 1]`` ``(B, 3, H, W)`` -> scaled latents (posterior sample, or its mean)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects (B, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        scale, shift = self._scale_shift
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - shift) * scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in ``[-1, 1]`` (unclamped, as the VAE gives them)."""
        scale, shift = self._scale_shift
        z = latents.to(self.vae.device, self.vae.dtype) / scale + shift
        return self.vae.decode(z, return_dict=False)[0]

    def to(self, device=None, dtype=None) -> Teacher:
        for module in (self.backbone, self.text_encoder, self.vae):
            module.to(device=device, dtype=dtype)
        self._empty.clear()
        return self


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_local(path: str) -> bool:
    """A path that exists, or that cannot be a hub id (``owner/name``), is treated as a local folder."""
    return os.path.exists(os.path.expanduser(path)) or not _HUB_ID.match(path)


def read_model_index(path: str) -> dict:
    """``model_index.json`` of a local folder or a hub repo, with a clear error if it is not a pipeline."""
    if _is_local(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise TeacherLoadError(f"teacher path {path!r} does not exist (expected a diffusers pipeline folder "
                                   "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5')")
        index = folder / "model_index.json"
        if not index.is_file():
            raise TeacherLoadError(f"{path!r} is not a diffusers pipeline folder: it has no model_index.json")
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path))
    except Exception as err:  # network, missing repo, gated repo: say what was attempted
        raise TeacherLoadError(f"{path!r} is not a local folder, and reading it as a hub repo failed: {err}") from err


def schedule_and_prediction(scheduler_config: dict):
    """Our schedule and prediction type from a diffusers scheduler config."""
    name = scheduler_config.get("prediction_type", "epsilon")
    if name not in PREDICTION_NAMES:
        raise TeacherLoadError(f"unsupported prediction_type {name!r} in the scheduler config; "
                               f"supported: {sorted(PREDICTION_NAMES)}")
    return VPSchedule.from_scheduler(scheduler_config), PREDICTION_NAMES[name]


def load_teacher(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Teacher:
    """Load a diffusers text-to-image pipeline (hub id or local folder) as a frozen :class:`Teacher`.

    Weights load as safetensors only. Every module is put in eval mode with ``requires_grad=False``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(path)
    index = read_model_index(path)
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise TeacherLoadError(f"{path!r} is a {cls}; supported pipelines: {SUPPORTED_PIPELINES}")

    def load(klass, subfolder):
        return klass.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True)

    scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler"))
    schedule, pred_type = schedule_and_prediction(scheduler_config)
    unet = load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    text_encoder = load(CLIPTextModel, "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device)
    return Teacher(backbone=DiffusionBackbone(unet, schedule, pred_type), tokenizer=tokenizer,
                   text_encoder=text_encoder, vae=vae, scheduler_config=scheduler_config, source=path,
                   pipeline_class=cls)


def sampling_grid(teacher: Teacher, num_steps: int) -> torch.Tensor:
    """The ``num_steps + 1`` times at which the teacher's own DDIM configuration samples
    (its ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``)."""
    cfg = teacher.scheduler_config
    return teacher.backbone.schedule.grid(num_steps, spacing=cfg.get("timestep_spacing", "leading"),
                                          steps_offset=int(cfg.get("steps_offset", 0)),
                                          final="clean" if cfg.get("set_alpha_to_one", True) else "first")
