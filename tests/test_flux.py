"""FLUX (issue 10): ``FluxPipeline`` behind the same backbone, against the stock pipeline on tiny random-init models.

The reference is diffusers' ``FluxPipeline``: prompt encoding (CLIP pooled + T5), the dynamically shifted sampling
grid, the guidance embedding of FLUX.1-dev and the true CFG of a model without one, and sampling of exported
students (full and LoRA). The latents stay ``(B, C, H, W)`` outside the backbone; packing is its business.
"""

import json
import shutil

import pytest
import torch
from conftest import TINY_PROMPTS, _clip_config, build_tiny_flux
from test_backbones import _edited_copy, _ours, _perturbed, _stock, _without_adapter

from diffdistill.backbone import flux_image_ids, pack_latents, unpack_latents
from diffdistill.export import export_student, load_student, read_recipe
from diffdistill.pipeline import TeacherLoadError, dynamic_shift_mu, load_teacher, sampling_grid
from diffdistill.sampling import generate

SIDE = 16  # image pixels: 8x8 latents, 4x4 packed tokens


@pytest.fixture(scope="module")
def flux_teacher(tiny_flux):
    return load_teacher(tiny_flux, resolution=SIDE)


def _flux_pipe(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_packing_is_the_pipelines(one_thread):
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(flux_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_flux_prompt_encoding_matches_stock_pipeline(tiny_flux, flux_teacher, one_thread):
    pipe = _flux_pipe(tiny_flux)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(TINY_PROMPTS, None, device="cpu")
        empty, empty_pooled, _ = pipe.encode_prompt([""], None, device="cpu")
    cond, uncond = flux_teacher.encode_prompt(TINY_PROMPTS), flux_teacher.empty_cond(1)
    assert cond.embeds.shape == (2, 512, 32) and cond.extra["text_embeds"].shape == (2, 32)
    for ours, ref in ((cond.embeds, embeds), (cond.extra["text_embeds"], pooled), (uncond.embeds, empty),
                      (uncond.extra["text_embeds"], empty_pooled)):
        assert torch.allclose(ours, ref, atol=1e-5)
    assert flux_teacher.backbone.embeds_guidance and flux_teacher.backbone.pred_type == "flow"


def test_flux_size_and_dynamic_shift(tiny_flux, flux_teacher):
    from diffusers import FluxPipeline

    assert flux_teacher.latent_shape == (4, 8, 8) and flux_teacher.image_size == SIDE
    native = load_teacher(tiny_flux)  # the pipeline's default: 128 x 128 latents
    assert native.latent_shape == (4, 128, 128) and FluxPipeline.from_pretrained(tiny_flux).default_sample_size == 128
    # the shift FluxPipeline applies at 16 packed tokens vs 4096: exp(mu), mu linear in the token count
    cfg = flux_teacher.scheduler_config
    assert flux_teacher.backbone.schedule.shift == pytest.approx(torch.tensor(dynamic_shift_mu(cfg, 16)).exp().item())
    assert native.backbone.schedule.shift == pytest.approx(torch.tensor(1.15).exp().item())
    with pytest.raises(TeacherLoadError, match="multiple of 4"):
        load_teacher(tiny_flux, resolution=18)  # 9x9 latents cannot be packed 2x2


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_flux_dev_sampler_reproduces_stock_pipeline(tiny_flux, flux_teacher, guidance, one_thread):
    """FLUX.1-dev: the guidance scale is embedded (one pass), never a CFG branch."""
    steps = 6
    ours = generate(flux_teacher, TINY_PROMPTS, num_steps=steps, guidance=guidance,
                    generator=torch.Generator().manual_seed(0))
    pipe = _flux_pipe(tiny_flux)
    ref = pipe(TINY_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=SIDE, width=SIDE,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    diff = (ours - ref).abs().max().item()
    print(f"\nFLUX-dev {steps} steps, embedded guidance {guidance}: max |ours - pipeline| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 3, SIDE, SIDE) and diff < 1e-4
    sigmas = sampling_grid(flux_teacher, steps)
    pipe.scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)],
                                 mu=dynamic_shift_mu(flux_teacher.scheduler_config, 16))
    assert torch.allclose(sigmas, pipe.scheduler.sigmas.double(), atol=1e-6)


def test_flux_true_cfg_without_guidance_embedding(tmp_path, one_thread):
    """A FLUX without a guidance embedding (schnell-like, fixed shift 1): CFG with the empty prompt's branch is the
    pipeline's ``true_cfg_scale`` with ``negative_prompt=""``."""
    path = build_tiny_flux(tmp_path / "plain", seed=3, guidance_embeds=False)
    path = _edited_copy(path, tmp_path / "schnell", "scheduler/scheduler_config.json", use_dynamic_shifting=False,
                        shift=1.0)
    teacher = load_teacher(path, resolution=SIDE)
    assert not teacher.backbone.embeds_guidance and teacher.backbone.schedule.shift == 1.0
    ours = generate(teacher, TINY_PROMPTS, num_steps=4, guidance=3.0, generator=torch.Generator().manual_seed(1))
    ref = _flux_pipe(path)(TINY_PROMPTS, num_inference_steps=4, true_cfg_scale=3.0, negative_prompt="",
                           height=SIDE, width=SIDE, generator=torch.Generator().manual_seed(1), output_type="pt").images
    diff = (ours - ref).abs().max().item()
    print(f"\nFLUX without guidance embedding, 4 steps, true CFG 3: max |ours - pipeline| = {diff:.2e}")
    assert diff < 1e-4
    unguided = generate(teacher, TINY_PROMPTS, num_steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1))
    assert (unguided - ours).abs().max() > 1e-3  # the CFG branch did something
    # a 1-step student with CFG 3 exports with FluxPipeline's true-CFG call (guidance_scale would be ignored)
    from diffusers import DiffusionPipeline

    student = _perturbed(teacher, "full", guidance=3.0)
    student.timesteps = [1.0]
    out = export_student(teacher, student, tmp_path / "student")
    assert 'true_cfg_scale=3.0, negative_prompt=""' in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(TINY_PROMPTS, num_inference_steps=1, true_cfg_scale=3.0, negative_prompt="", height=SIDE,
                  width=SIDE, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert (_ours(teacher, student) - theirs).abs().max() < 1e-4


def test_flux_teacher_defaults_and_refusals(tiny_flux, flux_teacher, tmp_path):
    """Sampled without a recipe, a FLUX.1-dev teacher uses FluxPipeline's 28 steps at embedded guidance 3.5 (one
    pass a step); it has no unconditional branch for a negative prompt; sizes and students are checked."""
    from diffdistill.eval.harness import EvalInputError, Model, recipe, resolve_models

    [model] = resolve_models(tiny_flux, resolution=SIDE)
    assert model.resolution == SIDE and recipe(model) == (None, 28, 3.5)
    assert model.load()[0].latent_shape == (4, 8, 8)
    with pytest.raises(ValueError, match="no unconditional prediction for a negative prompt"):
        generate(flux_teacher, TINY_PROMPTS, num_steps=2, guidance=3.5, negative_prompt="blurry")
    with pytest.raises(EvalInputError, match="--resolution must be a positive number"):
        resolve_models(tiny_flux, resolution=0)
    student = _perturbed(flux_teacher, "full", guidance=3.5)
    out = export_student(flux_teacher, student, tmp_path / "s")
    with pytest.raises(EvalInputError, match="--resolution applies to teachers only"):
        resolve_models(str(out), resolution=SIDE)
    with pytest.raises(TypeError, match="whole number of pixels"):
        load_teacher(tiny_flux, resolution=16.0)
    assert Model("x", "teacher", tiny_flux).resolution is None


def test_flux_guidance_embedding_and_features(flux_teacher, one_thread):
    bb = flux_teacher.backbone
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = flux_teacher.encode_prompt(TINY_PROMPTS)
    with torch.no_grad():
        unset, one, guided = bb(x, 0.5, cond), bb(x, 0.5, cond.with_guidance(1.0)), bb(x, 0.5, cond.with_guidance(4.0))
        assert torch.equal(unset, one) and (guided - one).abs().max() > 1e-4  # unset = 1 = no guidance
        # cfg() on a guidance-embedded model: one pass told the scale; the unconditional branch is not used
        assert torch.allclose(bb.cfg(x, 0.5, cond, flux_teacher.empty_cond(2), 4.0), guided)
        feats = bb.features(x, 0.5, cond)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            "block_0": (2, 32, 4, 4), "single_0": (2, 32, 4, 4), "single_1": (2, 32, 4, 4), "mid": (2, 32, 4, 4)}
        assert torch.equal(feats["mid"], feats["single_0"]) and bb.feature_levels() == ("block_0", "single_0", "single_1")
        # the token grid is the image's: moving one latent 2x2 patch moves that token's feature first
        bumped = x.clone()
        bumped[:, :, 0:2, 0:2] += 1.0
        first = bb.features(bumped, 0.5, cond, levels=("block_0",))["block_0"]
        change = (first - feats["block_0"]).abs().sum(dim=(0, 1))
        assert change[0, 0] == change.max()


def test_lcm_guidance_embedding_is_refused_on_a_transformer(flux_teacher):
    from diffdistill.config import ConfigError, StudentConfig
    from diffdistill.student import build_student

    with pytest.raises(ConfigError, match="student.guidance_embedding_dim.*FluxTransformer2DModel"):
        build_student(flux_teacher, StudentConfig(kind="full", guidance_embedding_dim=32))


def test_flux_full_student_exports_as_a_flux_pipeline(flux_teacher, tmp_path, one_thread):
    from diffusers import DiffusionPipeline

    student = _perturbed(flux_teacher, "full", guidance=3.5)  # FLUX.1-dev: the student is told guidance 3.5
    assert student.cfg_scale == 1.0
    out = export_student(flux_teacher, student, tmp_path / "full")
    pipe = DiffusionPipeline.from_pretrained(str(out))
    recipe = read_recipe(out)
    assert type(pipe).__name__ == "FluxPipeline" and recipe["scheduler"]["default_call_reproduces"]
    assert recipe["resolution"] == SIDE and f"height={SIDE}, width={SIDE}" in (out / "README.md").read_text()
    call = {"num_inference_steps": 4, "height": SIDE, "width": SIDE}
    ours, theirs = _ours(flux_teacher, student, global_seed=11), _stock(pipe, student, global_seed=11, **call)
    diff = (ours - theirs).abs().max().item()
    print(f"\nFLUX full student, 4 steps, guidance 3.5: max |ours - stock pipeline| = {diff:.2e}")
    assert diff < 1e-4 and pipe.scheduler.sigmas.tolist()[:-1] == pytest.approx(student.timesteps, abs=1e-6)
    other = _ours(flux_teacher, _perturbed(flux_teacher, "full", guidance=1.0), global_seed=11)
    assert (other - ours).abs().max() > 1e-3  # the embedded guidance matters
    t2, s2 = load_student(out)
    assert t2.latent_shape == (4, 8, 8) and (_ours(t2, s2, global_seed=11) - ours).abs().max() < 1e-5


def test_flux_lora_student_loads_with_load_lora_weights(tiny_flux, tmp_path, one_thread):
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = load_teacher(tiny_flux, resolution=SIDE)
    student = _perturbed(teacher, "lora", guidance=3.5, lora_rank=4, lora_alpha=2.0)
    student.timesteps = [1.0]
    out = export_student(teacher, student, tmp_path / "lora")
    pipe = _flux_pipe(tiny_flux)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.load_lora_weights(str(out))
    ours = _ours(teacher, student, global_seed=13)
    diff = (ours - _stock(pipe, student, global_seed=13, num_inference_steps=1, height=SIDE, width=SIDE)).abs().max()
    print(f"\nFLUX LoRA student, 1 step: max |ours - stock pipeline + load_lora_weights| = {diff.item():.2e}")
    assert diff < 1e-4 and (_ours(teacher, _without_adapter(student), global_seed=13) - ours).abs().mean() > 1e-3
    assert json.loads((out / "diffdistill.json").read_text())["base_pipeline"] == "FluxPipeline"
    t2, s2 = load_student(out)
    assert (_ours(t2, s2, global_seed=13) - ours).abs().max() < 1e-6


def test_inconsistent_flux_pipelines_are_refused(tiny_flux, tmp_path):
    from transformers import CLIPTextModel

    shutil.copytree(tiny_flux, tmp_path / "wide")
    CLIPTextModel(_clip_config(hidden_size=48)).save_pretrained(tmp_path / "wide" / "text_encoder")
    with pytest.raises(TeacherLoadError, match="pooled_projection_dim 32 vs the CLIP encoder's 48"):
        load_teacher(str(tmp_path / "wide"), resolution=SIDE)


def test_a_flux_dev_student_is_told_its_guidance(tiny_flux, tmp_path, one_thread):
    """DMD2's students sample without CFG; a FLUX.1-dev student has no CFG branch at all and is *told*
    ``student.guidance`` through the embedding (FastGen's FLUX DMD2 runs at 3.5), which set-up accepts."""
    from test_trainer import TINY

    from diffdistill.config import load_config
    from diffdistill.trainer import Trainer

    cfg = load_config(TINY, [f"teacher.path={tiny_flux}", "teacher.resolution=16", f"train.output_dir={tmp_path}",
                             "objective={name: dmd2}", "data.images=digits", "student.guidance=3.5"])
    trainer = Trainer(cfg)
    student, teacher = trainer.student, trainer.teacher
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompt(TINY_PROMPTS)
    with torch.no_grad():
        told = student(x, 0.5, cond)
        with student.backbone.adapter(student.adapter):
            assert torch.equal(told, student.backbone(x, 0.5, cond.with_guidance(3.5)))
            assert (told - student.backbone(x, 0.5, cond)).abs().max() > 1e-4
    assert student.cfg_scale == 1.0
