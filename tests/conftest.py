"""Shared fixtures: a tiny Stable-Diffusion-format pipeline built offline from config dicts."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

TINY_PROMPTS = ["a handwritten digit 3", "the number seven"]


def build_tiny_sd(folder, prediction_type: str = "epsilon", seed: int = 0):
    """A random-init StableDiffusionPipeline (16x16 images, 8x8x4 latents) saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffdistill.tokenizers import VOCAB_SIZE, build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    with tempfile.TemporaryDirectory() as bpe_dir:
        tokenizer = build_clip_tokenizer(bpe_dir)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@pytest.fixture()
def one_thread():
    """Small shapes run best on one intra-op thread; two threads on a busy 2-core machine were measured
    up to 50x slower (oversubscription). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """Path of a tiny epsilon-prediction SD pipeline folder, built once per test session."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    """The same architecture with v-prediction (SD2.1-style)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_sd):
    from diffdistill.pipeline import load_teacher

    return load_teacher(tiny_sd)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data ``x0 ~ N(0, c^2 I)`` under ``schedule``, answering in ``pred_type``
    with a diffusers-style signature. ``cond_shift`` adds ``cond_shift * mean(embeds)`` so that CFG
    and conditioning have a visible effect."""

    def __init__(self, schedule, pred_type: str, c: float = 0.5, cond_shift: float = 0.0):
        super().__init__()
        self.schedule, self.pred_type, self.c, self.cond_shift = schedule, pred_type, c, cond_shift
        self.calls = []

    def forward(self, x, timestep, encoder_hidden_states=None, return_dict=False, **_):
        from diffdistill.schedule import from_x0_eps

        t = self.schedule.from_timestep(timestep.double())
        self.calls.append(t.clone())
        a = self.schedule.alpha(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        s = self.schedule.sigma(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        x0 = a * self.c**2 / (a**2 * self.c**2 + s**2) * x
        if encoder_hidden_states is not None and self.cond_shift:
            x0 = x0 + self.cond_shift * encoder_hidden_states.mean(dim=(1, 2)).view(-1, *[1] * (x.ndim - 1))
        eps = (x - a * x0) / s.clamp_min(1e-12)
        return (from_x0_eps(x0, eps, t, self.pred_type, self.schedule),)
