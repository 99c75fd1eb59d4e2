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


def _clip_config(**overrides):
    """A tiny CLIP text-encoder config over the real CLIP vocabulary (3 layers, width 32)."""
    from transformers import CLIPTextConfig

    from diffdistill.tokenizers import VOCAB_SIZE

    return CLIPTextConfig(**{"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
                             "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, **overrides})


def build_tiny_sdxl(folder, prediction_type: str = "epsilon", seed: int = 0, force_zeros: bool = True):
    """A random-init StableDiffusionXLPipeline (16x16 images, 8x8x4 latents) saved to ``folder``: two CLIP
    text encoders (the second with a projection, its tokenizer padding with '!' as SDXL's does), a UNet with
    SDXL's ``text_time`` added conditioning and two transformer layers in its inner block, SDXL's VAE scaling
    and EulerDiscreteScheduler."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffdistill.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, attention_head_dim=(2, 4),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32 + 32, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(projection_dim=16, hidden_act="gelu"))
    with tempfile.TemporaryDirectory() as bpe_dir:
        tokenizer = build_clip_tokenizer(bpe_dir)
        tokenizer_2 = CLIPTokenizer.from_pretrained(bpe_dir, model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def tiny_t5_tokenizer():
    """A T5 tokenizer over a tiny unigram vocabulary (lower-case letters and digits, with and without the word
    marker), built offline with ``tokenizers``: ``<pad>`` 0, ``</s>`` 1 appended to every sequence, ``<unk>`` 2."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        extra_ids=0)


def build_tiny_sd3(folder, seed: int = 0):
    """A random-init StableDiffusion3Pipeline (16x16 images, 8x8x16 latents) saved to ``folder``: two CLIP text
    encoders with projections, a one-layer T5 encoder over a tiny vocabulary (:func:`tiny_t5_tokenizer`), an
    SD3Transformer2DModel with patch size 1, SD3's VAE scaling and shift, FlowMatchEulerDiscreteScheduler with
    SD3's shift 3."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffdistill.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = CLIPTextModelWithProjection(_clip_config(projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(projection_dim=16, hidden_act="gelu"))
    with tempfile.TemporaryDirectory() as bpe_dir:
        tokenizer = build_clip_tokenizer(bpe_dir)
        tokenizer_2 = build_clip_tokenizer(bpe_dir)
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=64, d_kv=8, num_layers=1,
                                             num_heads=2, relative_attention_num_buckets=8))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def build_tiny_flux(folder, seed: int = 0, guidance_embeds: bool = True):
    """A random-init FluxPipeline (16x16 images, 8x8x4 latents packed into 16 tokens of 16 channels) saved to
    ``folder``: a CLIP text encoder (pooled output), a one-layer T5 over a tiny vocabulary
    (:func:`tiny_t5_tokenizer`), a FluxTransformer2DModel with one double- and two single-stream blocks and, by
    default, FLUX.1-dev's guidance embedding; FLUX's VAE scaling and shift; FLUX.1-dev's dynamically shifting
    FlowMatchEulerDiscreteScheduler (base_shift 0.5, max_shift 1.15, sequence lengths 256..4096)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffdistill.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = CLIPTextModel(_clip_config())
    with tempfile.TemporaryDirectory() as bpe_dir:
        tokenizer = build_clip_tokenizer(bpe_dir)
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                             num_heads=2, relative_attention_num_buckets=8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
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
def tiny_sdxl(tmp_path_factory) -> str:
    """Path of a tiny SDXL pipeline folder (epsilon, force_zeros_for_empty_prompt), built once per session."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    """Path of a tiny SD3 pipeline folder (rectified flow, shift 3, with a tiny T5), built once per session."""
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    """Path of a tiny FLUX.1-dev-style pipeline folder (guidance-distilled, dynamic shifting), built once."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


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
