"""Loading, prompt encoding and the VAE for diffusers text-to-image pipelines.

This module is the only place where diffusers' own vocabulary appears (``epsilon``,
``v_prediction``, ``model_index.json``, scheduler configs); everything it hands out speaks
diffdistill's: continuous ``t``, :class:`~diffdistill.backbone.Cond`, prediction types
``x0 | eps | v | flow``.

What differs between pipeline classes -- which text encoders a pipeline has, how a prompt becomes a
:class:`~diffdistill.backbone.Cond`, what the unconditional branch of CFG is, which modules an exported
pipeline needs -- lives in one small adapter per class (:class:`StableDiffusion`,
:class:`StableDiffusionXL`, :class:`StableDiffusion3`, :class:`Flux`), registered in :data:`FAMILIES`.
Supporting a new pipeline means writing one more adapter (and, for a denoiser with a new call signature, one
branch in :meth:`DiffusionBackbone._denoise`); nothing else changes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .backbone import Cond, DiffusionBackbone
from .schedule import FlowSchedule, VPSchedule

# diffusers' prediction_type -> ours
PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


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
    tokenizer_2: object = None                   # SDXL's second tokenizer and text encoder (with projection)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_3: object = None                   # SD3's T5 tokenizer and encoder (None when the pipeline drops T5)
    text_encoder_3: torch.nn.Module | None = None
    pipeline_config: dict = field(default_factory=dict)  # model_index.json's settings, e.g. force_zeros_for_empty_prompt
    resolution: int | None = None                # image side in pixels; None: the denoiser's native size
    vae_source: str | None = None                # a replacement VAE (teacher.vae), None: the pipeline's own
    _empty: dict = field(default_factory=dict, repr=False)
    _prompts: OrderedDict = field(default_factory=OrderedDict, repr=False)  # (prompt, resolution) -> Cond of batch 1
    PROMPT_CACHE_BYTES: ClassVar[int] = 64 * 2**20  # embeddings kept by encode_prompt, least recently used dropped

    @property
    def family(self) -> Family:
        """The adapter for this teacher's pipeline class (see :data:`FAMILIES`)."""
        return FAMILIES[self.pipeline_class]

    @property
    def device(self) -> torch.device:
        return next(self.backbone.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD, SDXL, SD3 and FLUX)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents at :attr:`resolution` (default: the denoiser's native size)."""
        side = self.resolution // self.vae_scale_factor if self.resolution else self.family.native_latent_side(self)
        return (self.backbone.latent_channels, side, side)

    @property
    def image_size(self) -> int:
        """Side of the images the VAE decodes these latents to."""
        return self.latent_shape[-1] * self.vae_scale_factor

    # -- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> Cond:
        """Prompt embeddings exactly as the pipeline class's own ``encode_prompt`` computes them.

        The text encoders are frozen everywhere in diffdistill, so each distinct prompt is encoded once and its
        embedding kept (up to :attr:`PROMPT_CACHE_BYTES`, least recently used dropped first; :meth:`to` clears
        them): a run over a small prompt pool pays the text encoders once per prompt, not once per step."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
            raise TypeError("encode_prompt expects a string or a non-empty list of strings")
        keys = [(p, self.resolution) for p in prompts]  # SDXL's time_ids depend on the size
        missing = [k for k in dict.fromkeys(keys) if k not in self._prompts]
        if missing:
            new = self.family.encode(self, [p for p, _ in missing]).to(dtype=self.dtype, device=self.device)
            for i, k in enumerate(missing):
                self._prompts[k] = new.select(i)
        for k in keys:
            self._prompts.move_to_end(k)
        out = Cond.cat([self._prompts[k] for k in keys])
        size = sum(c.nbytes for c in self._prompts.values())
        while size > self.PROMPT_CACHE_BYTES and len(self._prompts) > 1:
            size -= self._prompts.popitem(last=False)[1].nbytes
        return out

    def encode_captions(self, captions: Sequence[str]) -> Cond:
        """Training captions, some dropped to "" to train an unconditional branch: a dropped one is encoded as the
        CFG branch it stands for at sampling (:meth:`empty_cond`: zeros under SDXL's
        ``force_zeros_for_empty_prompt``, where ``encode_prompt("")`` is not zeros), the others as
        :meth:`encode_prompt`."""
        cond = self.encode_prompt(list(captions))
        if "" not in captions:
            return cond
        empty = self.empty_cond(1)
        return Cond.cat([empty if c == "" else cond.select(i) for i, c in enumerate(captions)])

    def empty_cond(self, batch_size: int = 1) -> Cond:
        """The unconditional branch of CFG when no negative prompt is given, as the pipeline builds it (the
        empty prompt's embedding; zeros for SDXL's ``force_zeros_for_empty_prompt``); cached."""
        if "cond" not in self._empty:
            self._empty["cond"] = self.family.empty(self).to(dtype=self.dtype, device=self.device)
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
        for module in (self.backbone, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae):
            if module is not None:  # a force_upcast VAE stays float32 beside a float16 teacher (load_teacher)
                upcast = module is self.vae and dtype == torch.float16 and getattr(module.config, "force_upcast", False)
                module.to(device=device, dtype=None if upcast else dtype)
        self._empty.clear()
        self._prompts.clear()
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


def dynamic_shift_mu(scheduler_config: dict, image_seq_len: int) -> float:
    """The ``mu`` that FLUX's and SD3's pipelines compute for ``use_dynamic_shifting`` schedulers: linear in the
    number of image tokens between (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``,
    ``max_shift``) -- the pipelines' ``calculate_shift`` with the scheduler config's values."""
    c = scheduler_config
    lo, hi = float(c.get("base_image_seq_len", 256)), float(c.get("max_image_seq_len", 4096))
    b_lo, b_hi = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
    return b_lo + (b_hi - b_lo) * (image_seq_len - lo) / (hi - lo)


def embeds_guidance_locally(path: str) -> bool | None:
    """Whether the pipeline folder ``path`` holds a denoiser that embeds the guidance scale (a FLUX transformer
    with ``guidance_embeds``, a UNet with ``time_cond_proj_dim``), read from its JSON configs without loading
    weights; None when ``path`` is not a local folder (a hub id) or its configs cannot be read."""
    folder = Path(path)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        family = FAMILIES[index["_class_name"]]
        config = json.loads((folder / family.denoiser[1] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bool(config.get("guidance_embeds")) or config.get("time_cond_proj_dim") is not None


def schedule_and_prediction(scheduler_config: dict, image_seq_len: int | None = None):
    """Our schedule and prediction type from a diffusers scheduler config: ``FlowMatchEulerDiscreteScheduler``
    -> :class:`FlowSchedule` with its ``shift``, predicting the flow; any other -> :class:`VPSchedule`.

    A ``use_dynamic_shifting`` scheduler (FLUX.1-dev) shifts by image size; at a fixed size its shift is a fixed
    SD3-style shift (``time_shift(mu, 1, t)`` = ``shift_t`` with shift ``exp(mu)``, or ``mu`` for
    ``time_shift_type: linear``), computed for ``image_seq_len`` image tokens."""
    if scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        shift = float(scheduler_config.get("shift", 1.0))
        if scheduler_config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise TeacherLoadError("the scheduler shifts its timesteps by image size (use_dynamic_shifting); "
                                       "the number of image tokens is needed to fix the shift")
            mu = dynamic_shift_mu(scheduler_config, image_seq_len)
            kind = scheduler_config.get("time_shift_type", "exponential")
            if kind not in ("exponential", "linear"):
                raise TeacherLoadError(f"unsupported time_shift_type {kind!r} in the scheduler config")
            shift = math.exp(mu) if kind == "exponential" else mu
        return FlowSchedule(shift=shift, num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000))), "flow"
    name = scheduler_config.get("prediction_type", "epsilon")
    if name not in PREDICTION_NAMES:
        raise TeacherLoadError(f"unsupported prediction_type {name!r} in the scheduler config; "
                               f"supported: {sorted(PREDICTION_NAMES)}")
    return VPSchedule.from_scheduler(scheduler_config), PREDICTION_NAMES[name]


# -- one adapter per pipeline class --------------------------------------------------------------------
def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """``(B, L)`` ids padded to the tokenizer's ``model_max_length``, as every SD pipeline tokenizes."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class Family:
    """What differs between diffusers text-to-image pipeline classes. ``text_encoders`` maps each text
    encoder's subfolder to its transformers class; its tokenizer lives in the matching ``tokenizer*``."""

    pipeline_class: ClassVar[str] = ""
    denoiser: ClassVar[tuple[str, str]] = ("UNet2DConditionModel", "unet")  # diffusers class, subfolder
    text_encoders: ClassVar[dict[str, str]] = {}
    optional: ClassVar[frozenset[str]] = frozenset()  # text encoders a pipeline may leave out ([null, null])
    tokenizers: ClassVar[dict[str, str]] = {}         # tokenizer class per text encoder (default CLIPTokenizer)
    sampler_defaults: ClassVar[tuple[int, float]] = (25, 7.5)  # (steps, guidance) when a teacher sample names none

    def encode(self, teacher: Teacher, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def defaults(self, teacher: Teacher) -> tuple[int, float]:
        """``(steps, guidance)`` to sample this teacher with when none are given: the pipeline's own guidance."""
        return self.sampler_defaults

    def native_latent_side(self, teacher: Teacher) -> int:
        """The latent side the pipeline generates at by default (its denoiser's ``sample_size``)."""
        return int(teacher.backbone.denoiser.config.sample_size)

    def check_resolution(self, teacher: Teacher) -> None:
        """Refuse a ``resolution`` the pipeline could not generate at."""
        step = teacher.vae_scale_factor * teacher.backbone.token_stride
        if teacher.resolution is not None and (teacher.resolution <= 0 or teacher.resolution % step):
            raise TeacherLoadError(f"{teacher.source!r}: resolution {teacher.resolution} must be a positive multiple of "
                                   f"{step} (the VAE's factor {teacher.vae_scale_factor} x the denoiser's token stride "
                                   f"{teacher.backbone.token_stride})")

    def sigma_kwargs(self, teacher: Teacher, num_steps: int) -> dict:
        """Flow teachers: the extra arguments the pipeline passes to ``FlowMatchEulerDiscreteScheduler.set_timesteps``
        (``mu`` for a dynamically shifting scheduler, as SD3's pipeline does)."""
        cfg = teacher.scheduler_config
        return {"mu": self.mu(teacher)} if cfg.get("use_dynamic_shifting") else {}

    def mu(self, teacher: Teacher) -> float:
        """``mu`` of a dynamically shifting scheduler at the teacher's latent size."""
        side = teacher.latent_shape[-1] // teacher.backbone.token_stride
        return dynamic_shift_mu(teacher.scheduler_config, side * side)

    def empty(self, teacher: Teacher) -> Cond:
        """CFG's unconditional branch without a negative prompt: the empty prompt, encoded."""
        return self.encode(teacher, [""])

    def validate(self, teacher: Teacher) -> None:
        """Refuse, at load time, a pipeline whose components do not fit together."""
        if getattr(teacher.vae.config, "latents_mean", None) is not None:
            raise TeacherLoadError(f"{teacher.source!r}: its VAE normalises latents with latents_mean / latents_std, "
                                   "which diffdistill's encode_images / decode_latents do not apply yet")

    def pipeline_modules(self, teacher: Teacher) -> dict:
        """The pipeline constructor's arguments besides ``vae``, ``unet`` and ``scheduler`` (for export)."""
        raise NotImplementedError


class UNetFamily(Family):
    """Pipelines whose UNet cross-attends to the concatenated hidden states of all their text encoders."""

    def validate(self, teacher: Teacher) -> None:
        super().validate(teacher)
        width = sum(getattr(teacher, name).config.hidden_size for name in self.text_encoders)
        unet = teacher.backbone.denoiser.config
        if unet.cross_attention_dim != width:
            raise TeacherLoadError(f"{teacher.source!r}: the UNet's cross_attention_dim is {unet.cross_attention_dim} "
                                   f"but its text encoders give {width}-wide embeddings")


class StableDiffusion(UNetFamily):
    """``StableDiffusionPipeline`` (SD1.x, SD2.x: epsilon or v-prediction): one CLIP text encoder, its last
    hidden state as the cross-attention input; the empty prompt's embedding for CFG."""

    pipeline_class = "StableDiffusionPipeline"
    text_encoders: ClassVar[dict[str, str]] = {"text_encoder": "CLIPTextModel"}

    def encode(self, teacher: Teacher, prompts: list[str]) -> Cond:
        encoder = teacher.text_encoder
        tok = teacher.tokenizer(prompts, padding="max_length", max_length=teacher.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
        return Cond(encoder(tok.input_ids.to(encoder.device), attention_mask=mask)[0])

    def validate(self, teacher: Teacher) -> None:
        super().validate(teacher)
        added = teacher.backbone.denoiser.config.addition_embed_type
        if added is not None:
            raise TeacherLoadError(f"{teacher.source!r}: a StableDiffusionPipeline whose UNet expects added "
                                   f"conditioning {added!r}, which this pipeline never passes")

    def pipeline_modules(self, teacher: Teacher) -> dict:
        return {"text_encoder": teacher.text_encoder, "tokenizer": teacher.tokenizer, "safety_checker": None,
                "feature_extractor": None, "requires_safety_checker": False}


class StableDiffusionXL(UNetFamily):
    """``StableDiffusionXLPipeline``: two CLIP text encoders whose penultimate hidden states are concatenated
    (``embeds``), the second one's projected pooled output (``extra["text_embeds"]``) and the micro-conditioning
    ``extra["time_ids"] = (H, W, 0, 0, H, W)`` (original size, crop top-left, target size) for the teacher's
    image size (``teacher.resolution``, default native). Without a negative prompt, CFG's unconditional branch is zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` is set (SDXL base's default), else the encoded empty prompt."""

    pipeline_class = "StableDiffusionXLPipeline"
    sampler_defaults: ClassVar[tuple[int, float]] = (25, 5.0)  # the pipeline's guidance_scale default
    text_encoders: ClassVar[dict[str, str]] = {"text_encoder": "CLIPTextModel",
                                               "text_encoder_2": "CLIPTextModelWithProjection"}

    def encode(self, teacher: Teacher, prompts: list[str]) -> Cond:
        hidden, pooled = [], None
        for tokenizer, encoder in ((teacher.tokenizer, teacher.text_encoder), (teacher.tokenizer_2, teacher.text_encoder_2)):
            out = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the pipeline's rule: the first (B, D) output is the pooled one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)  # (B, 77, D1 + D2)
        return Cond(embeds, {"text_embeds": pooled, "time_ids": self.time_ids(teacher, len(prompts)).to(embeds)})

    @staticmethod
    def time_ids(teacher: Teacher, n: int) -> torch.Tensor:
        """``(n, 6)``: original size, crop top-left, target size -- the pipeline's defaults at the teacher's
        image size (``height = width = teacher.image_size``)."""
        side = teacher.image_size
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(n, 1)

    def empty(self, teacher: Teacher) -> Cond:
        if not teacher.pipeline_config.get("force_zeros_for_empty_prompt", True):
            return self.encode(teacher, [""])
        cond = self.encode(teacher, [""])
        return Cond(torch.zeros_like(cond.embeds), {"text_embeds": torch.zeros_like(cond.extra["text_embeds"]),
                                                    "time_ids": cond.extra["time_ids"]})

    def validate(self, teacher: Teacher) -> None:
        super().validate(teacher)
        unet = teacher.backbone.denoiser
        if unet.config.addition_embed_type != "text_time":
            raise TeacherLoadError(f"{teacher.source!r}: an SDXL pipeline needs a UNet with addition_embed_type "
                                   f"'text_time', this one has {unet.config.addition_embed_type!r}")
        passed = 6 * unet.config.addition_time_embed_dim + teacher.text_encoder_2.config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise TeacherLoadError(f"{teacher.source!r}: the UNet's added embedding takes {expected} features, but 6 "
                                   f"time ids x {unet.config.addition_time_embed_dim} + the pooled projection "
                                   f"({teacher.text_encoder_2.config.projection_dim}) give {passed}")

    def pipeline_modules(self, teacher: Teacher) -> dict:
        return {"text_encoder": teacher.text_encoder, "text_encoder_2": teacher.text_encoder_2,
                "tokenizer": teacher.tokenizer, "tokenizer_2": teacher.tokenizer_2,
                "force_zeros_for_empty_prompt": teacher.pipeline_config.get("force_zeros_for_empty_prompt", True)}


class StableDiffusion3(Family):
    """``StableDiffusion3Pipeline`` (SD3 / SD3.5, rectified flow): two CLIP text encoders with projections and
    an optional T5. ``embeds`` = the CLIP encoders' penultimate hidden states, concatenated and zero-padded to
    T5's width, followed along the sequence by T5's ``max_sequence_length`` (256) token embeddings -- zeros
    when the pipeline has no T5; ``extra["text_embeds"]`` = both pooled projections, concatenated (the
    transformer's ``pooled_projections``). CFG's unconditional branch is the encoded empty prompt."""

    pipeline_class = "StableDiffusion3Pipeline"
    sampler_defaults: ClassVar[tuple[int, float]] = (28, 7.0)  # the pipeline's defaults
    denoiser = ("SD3Transformer2DModel", "transformer")
    text_encoders: ClassVar[dict[str, str]] = {"text_encoder": "CLIPTextModelWithProjection",
                                               "text_encoder_2": "CLIPTextModelWithProjection",
                                               "text_encoder_3": "T5EncoderModel"}
    optional: ClassVar[frozenset[str]] = frozenset({"text_encoder_3"})
    tokenizers: ClassVar[dict[str, str]] = {"text_encoder_3": "AutoTokenizer"}
    t5_length = 256  # the pipeline's default max_sequence_length

    def encode(self, teacher: Teacher, prompts: list[str]) -> Cond:
        hidden, pooled = [], []
        for tokenizer, encoder in ((teacher.tokenizer, teacher.text_encoder), (teacher.tokenizer_2, teacher.text_encoder_2)):
            out = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)  # (B, 77, D1 + D2)
        t5 = self._t5(teacher, prompts, clip)  # (B, 256, joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Cond(torch.cat([clip, t5], dim=-2), {"text_embeds": torch.cat(pooled, dim=-1)})

    def _t5(self, teacher: Teacher, prompts: list[str], like: torch.Tensor) -> torch.Tensor:
        if teacher.text_encoder_3 is None:
            width = teacher.backbone.denoiser.config.joint_attention_dim
            return torch.zeros(len(prompts), self.t5_length, width, dtype=like.dtype, device=like.device)
        ids = teacher.tokenizer_3(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                  add_special_tokens=True, return_tensors="pt").input_ids
        return teacher.text_encoder_3(ids.to(teacher.text_encoder_3.device))[0].to(like)

    def validate(self, teacher: Teacher) -> None:
        super().validate(teacher)
        net = teacher.backbone.denoiser.config
        pooled = teacher.text_encoder.config.projection_dim + teacher.text_encoder_2.config.projection_dim
        if pooled != net.pooled_projection_dim:
            raise TeacherLoadError(f"{teacher.source!r}: the transformer's pooled_projection_dim is "
                                   f"{net.pooled_projection_dim} but the CLIP projections give {pooled}")
        width = teacher.text_encoder.config.hidden_size + teacher.text_encoder_2.config.hidden_size
        t5 = net.joint_attention_dim if teacher.text_encoder_3 is None else teacher.text_encoder_3.config.d_model
        if t5 != net.joint_attention_dim or width > t5:
            raise TeacherLoadError(f"{teacher.source!r}: the transformer's joint_attention_dim is "
                                   f"{net.joint_attention_dim}; T5 gives {t5}-wide and the CLIP encoders {width}-wide "
                                   "embeddings (CLIP must fit inside T5's width)")

    def check_resolution(self, teacher: Teacher) -> None:
        super().check_resolution(teacher)
        net = teacher.backbone.denoiser.config
        tokens = teacher.latent_shape[-1] // net.patch_size
        if net.pos_embed_max_size is not None and tokens > net.pos_embed_max_size:
            raise TeacherLoadError(f"{teacher.source!r}: resolution {teacher.image_size} needs {tokens} patches a side, "
                                   f"more than the transformer's pos_embed_max_size {net.pos_embed_max_size}")

    def pipeline_modules(self, teacher: Teacher) -> dict:
        return {"text_encoder": teacher.text_encoder, "text_encoder_2": teacher.text_encoder_2,
                "text_encoder_3": teacher.text_encoder_3, "tokenizer": teacher.tokenizer,
                "tokenizer_2": teacher.tokenizer_2, "tokenizer_3": teacher.tokenizer_3}


class Flux(Family):
    """``FluxPipeline`` (FLUX.1 [dev] / [schnell], rectified flow): a CLIP text encoder whose pooled output is
    ``extra["text_embeds"]`` (the transformer's ``pooled_projections``) and a T5 encoder whose
    ``max_sequence_length`` (512) token embeddings are ``embeds``. The 2x2 packing of the latents, the position
    ids and the guidance embedding of guidance-distilled models live in the backbone; latents stay
    ``(B, 16, H, W)``. Default size: the pipeline's 128 x 128 latents (1024 px). The scheduler shifts by image
    size (``use_dynamic_shifting``); the pipeline samples on ``linspace(1, 1/n, n)`` shifted by ``mu``.
    FLUX.1-dev has no CFG branch: a guidance scale is embedded (:attr:`DiffusionBackbone.embeds_guidance`);
    without a guidance embedding (schnell) CFG's unconditional branch is the encoded empty prompt, as the
    pipeline's ``true_cfg_scale`` with ``negative_prompt=""``."""

    pipeline_class = "FluxPipeline"
    sampler_defaults: ClassVar[tuple[int, float]] = (28, 3.5)  # the pipeline's defaults (3.5: embedded, FLUX.1-dev)
    denoiser = ("FluxTransformer2DModel", "transformer")
    text_encoders: ClassVar[dict[str, str]] = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    tokenizers: ClassVar[dict[str, str]] = {"text_encoder_2": "AutoTokenizer"}
    t5_length = 512  # the pipeline's default max_sequence_length
    default_sample_size = 128  # FluxPipeline.default_sample_size: latents of this side by default

    def defaults(self, teacher: Teacher) -> tuple[int, float]:
        """Without a guidance embedding (schnell) the pipeline runs no guidance unless ``true_cfg_scale`` is set."""
        steps, guidance = self.sampler_defaults
        return steps, guidance if teacher.backbone.embeds_guidance else 1.0

    def encode(self, teacher: Teacher, prompts: list[str]) -> Cond:
        clip = teacher.text_encoder
        pooled = clip(_token_ids(teacher.tokenizer, prompts, clip.device), output_hidden_states=False).pooler_output
        t5 = teacher.text_encoder_2
        ids = teacher.tokenizer_2(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                  return_tensors="pt").input_ids
        return Cond(t5(ids.to(t5.device), output_hidden_states=False)[0], {"text_embeds": pooled})

    def native_latent_side(self, teacher: Teacher) -> int:
        return self.default_sample_size

    def sigma_kwargs(self, teacher: Teacher, num_steps: int) -> dict:
        import numpy as np

        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": self.mu(teacher)}

    def validate(self, teacher: Teacher) -> None:
        super().validate(teacher)
        net = teacher.backbone.denoiser.config
        problems = []
        if teacher.text_encoder.config.hidden_size != net.pooled_projection_dim:
            problems.append(f"pooled_projection_dim {net.pooled_projection_dim} vs the CLIP encoder's "
                            f"{teacher.text_encoder.config.hidden_size}")
        if teacher.text_encoder_2.config.d_model != net.joint_attention_dim:
            problems.append(f"joint_attention_dim {net.joint_attention_dim} vs T5's {teacher.text_encoder_2.config.d_model}")
        if net.in_channels != 4 * teacher.vae.config.latent_channels:
            problems.append(f"in_channels {net.in_channels} vs 4 x the VAE's {teacher.vae.config.latent_channels} latent "
                            "channels (2x2 packing)")
        if problems:
            raise TeacherLoadError(f"{teacher.source!r}: the transformer does not fit the other components: "
                                   + "; ".join(problems))

    def pipeline_modules(self, teacher: Teacher) -> dict:
        return {"text_encoder": teacher.text_encoder, "text_encoder_2": teacher.text_encoder_2,
                "tokenizer": teacher.tokenizer, "tokenizer_2": teacher.tokenizer_2}


FAMILIES: dict[str, Family] = {f.pipeline_class: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(),
                                                             Flux())}
SUPPORTED_PIPELINES = tuple(FAMILIES)


def _present(index: dict, name: str) -> bool:
    """A pipeline folder names each component as ``[library, class]``; ``[null, null]`` means absent."""
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def _text_components(family: Family, index: dict, path: str, load, weights: bool = True) -> tuple[dict, dict]:
    """``(text encoders, tokenizers)`` by text encoder name; an optional one the folder lacks is None. Without
    ``weights``, the tokenizers are :class:`ShapeTokenizer` stand-ins."""
    import transformers

    encoders, tokenizers = {}, {}
    for name, klass in family.text_encoders.items():
        if not _present(index, name):
            if name not in family.optional:
                raise TeacherLoadError(f"{path!r} ({family.pipeline_class}) has no {name}; diffdistill needs it")
            encoders[name] = tokenizers[name] = None
            continue
        encoders[name] = load(getattr(transformers, klass), name)
        if not weights:
            tokenizers[name] = ShapeTokenizer()
            continue
        tokenizer_class = getattr(transformers, family.tokenizers.get(name, "CLIPTokenizer"))
        tokenizers[name] = tokenizer_class.from_pretrained(path, subfolder=name.replace("text_encoder", "tokenizer"))
    return encoders, tokenizers


# -- real architectures without weights (diffdistill plan) ---------------------------------------------
class ShapeTokenizer:
    """Stands in for a tokenizer where only shapes matter (a teacher on the meta device): every prompt becomes
    ``max_length`` (default CLIP's 77) token ids of 0, with a full attention mask."""

    model_max_length = 77

    def __call__(self, prompts, max_length=None, return_tensors="pt", **_):
        from types import SimpleNamespace

        n = 1 if isinstance(prompts, str) else len(prompts)
        ids = torch.zeros(n, max_length or self.model_max_length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def config_folder(path: str) -> str:
    """Where the JSON configs of ``path`` are: a local pipeline folder itself, else the architecture configs
    shipped for that hub id (:func:`diffdistill.architectures.folder`)."""
    if _is_local(path):
        return path
    from .architectures import folder

    found = folder(path)
    if found is None:
        from .architectures import KNOWN

        raise TeacherLoadError(f"{path!r}: no architecture configs are shipped for this hub id (known: "
                               f"{', '.join(KNOWN)}); give a local pipeline folder, whose JSON configs are read")
    return str(found)


def _meta_module(klass, folder: str, subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
    """``klass`` (a diffusers model or a transformers model) at the architecture of ``folder/subfolder``'s
    config.json, with every parameter and buffer on the meta device in ``dtype``."""
    config_path = Path(folder) / subfolder / "config.json"
    if not config_path.is_file():
        raise TeacherLoadError(f"{folder!r} has no {subfolder}/config.json")
    config = json.loads(config_path.read_text())
    from diffusers.utils import logging as diffusers_logging

    with torch.device("meta"):
        if hasattr(klass, "from_config"):  # diffusers
            model = klass.from_config(config)
        else:  # transformers
            model = klass(klass.config_class.from_dict(config))
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice to cast at load time is for weights; there are none
    try:
        return model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _replacement_vae(path: str, vae: str, dtype: torch.dtype):
    """``teacher.vae``: an AutoencoderKL from a hub id or local folder (its own, or a pipeline's ``vae/``) in place
    of the pipeline's, e.g. an fp16-fix VAE; its latent channels must be the pipeline VAE's."""
    from diffusers import AutoencoderKL

    sub = "vae" if (Path(vae) / "vae" / "config.json").is_file() else None
    try:
        model = AutoencoderKL.from_pretrained(vae, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise TeacherLoadError(f"teacher.vae {vae!r} could not be loaded as an AutoencoderKL: {err}") from err
    own = AutoencoderKL.load_config(path, subfolder="vae")["latent_channels"]
    if model.config.latent_channels != own:
        raise TeacherLoadError(f"teacher.vae {vae!r} has {model.config.latent_channels} latent channels; the "
                               f"teacher's own VAE has {own}")
    return model


def load_teacher(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 resolution: int | None = None, vae: str | None = None, weights: bool = True) -> Teacher:
    """Load a diffusers text-to-image pipeline (hub id or local folder) as a frozen :class:`Teacher`.

    ``resolution``: the image side to generate and train at, in pixels (default: the pipeline's native size,
    e.g. 512 for SD1.5, 1024 for SDXL and FLUX). ``vae``: a replacement VAE (hub id or folder). A VAE whose config
    sets ``force_upcast`` (SDXL's, which overflows in fp16) is kept in float32 when ``dtype`` is float16, as
    diffusers' pipelines upcast it. Weights load as safetensors only. Every module is put in eval mode with
    ``requires_grad=False``.

    ``weights=False``: the real architecture without weights, every module on the meta device (``device`` is
    ignored), built from the pipeline's JSON configs -- a local folder's, or for a hub id the copy that
    :mod:`diffdistill.architectures` ships (no download). Tokenizers are :class:`ShapeTokenizer` stand-ins, so
    prompts encode to embeddings of the right shapes and no values. For planning memory (``diffdistill plan``).
    """
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler

    path = str(path)
    if resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool)):
        raise TypeError(f"resolution is a whole number of pixels, got {resolution!r}")
    source = path if weights else config_folder(path)
    index = read_model_index(source)
    cls = index.get("_class_name")
    if cls not in FAMILIES:
        raise TeacherLoadError(f"{path!r} is a {cls}; supported pipelines: {SUPPORTED_PIPELINES}")
    family = FAMILIES[cls]

    def load(klass, subfolder):
        if not weights:
            return _meta_module(klass, source, subfolder, dtype)
        return klass.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True)

    scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler"))
    denoiser = load(getattr(diffusers, family.denoiser[0]), family.denoiser[1])
    if vae is None or not weights:  # planning: a replacement VAE has the pipeline VAE's latent channels (checked
        vae_model = load(AutoencoderKL, "vae")  # at load) and is taken to have its size
    else:
        vae_model = _replacement_vae(path, vae, dtype)
    if dtype == torch.float16 and getattr(vae_model.config, "force_upcast", False):
        vae_model = vae_model.float()
    encoders, tokenizers = _text_components(family, index, source, load, weights)
    device = "meta" if not weights else device
    for module in (denoiser, vae_model, *encoders.values()):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    # the schedule is set below: a dynamically shifting flow scheduler's shift depends on the latent size
    backbone = DiffusionBackbone(denoiser, FlowSchedule(), "flow")
    teacher = Teacher(backbone=backbone, tokenizer=tokenizers["text_encoder"],
                      text_encoder=encoders["text_encoder"], vae=vae_model, scheduler_config=scheduler_config, source=path,
                      pipeline_class=cls, tokenizer_2=tokenizers.get("text_encoder_2"),
                      text_encoder_2=encoders.get("text_encoder_2"), tokenizer_3=tokenizers.get("text_encoder_3"),
                      text_encoder_3=encoders.get("text_encoder_3"), pipeline_config=settings, resolution=resolution,
                      vae_source=vae)
    family.check_resolution(teacher)
    tokens = (teacher.latent_shape[-1] // backbone.token_stride) ** 2
    backbone.schedule, backbone.pred_type = schedule_and_prediction(scheduler_config, tokens)
    family.validate(teacher)
    return teacher


def sampling_grid(teacher: Teacher, num_steps: int) -> torch.Tensor:
    """The ``num_steps + 1`` times at which the teacher's own DDIM configuration samples (its
    ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``); for a flow teacher, the sigmas its own
    ``FlowMatchEulerDiscreteScheduler`` sets when its pipeline calls it (shift, ``shift_terminal``, ... as
    configured; FLUX's pipeline passes ``sigmas = linspace(1, 1/n, n)`` and ``mu``)."""
    cfg = teacher.scheduler_config
    if isinstance(teacher.backbone.schedule, FlowSchedule):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        kwargs = teacher.family.sigma_kwargs(teacher, num_steps)
        scheduler.set_timesteps(None if "sigmas" in kwargs else num_steps, **kwargs)
        return scheduler.sigmas.double()
    return teacher.backbone.schedule.grid(num_steps, spacing=cfg.get("timestep_spacing", "leading"),
                                          steps_offset=int(cfg.get("steps_offset", 0)),
                                          final="clean" if cfg.get("set_alpha_to_one", True) else "first")
