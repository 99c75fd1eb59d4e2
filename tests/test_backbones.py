"""Teachers beyond SD1.5 (issue 10): SD2.1-style v-prediction, SDXL and SD3 behind the same backbone.

The stock diffusers pipelines are the reference: prompt encoding, CFG's unconditional branch and the
teacher sampler must reproduce ``StableDiffusionXLPipeline`` (with its own EulerDiscreteScheduler) and
``StableDiffusion3Pipeline`` (with and without T5) on tiny random-init models; SDXL exports load in the stock
pipeline; backbone mismatches fail at set-up. (Every objective on every backbone: the contract suite in
``test_objectives.py``.)
(SD2.1-style v-prediction sampling against ``StableDiffusionPipeline`` is in ``test_pipeline.py``.)
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROMPTS
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline

from diffdistill import lora
from diffdistill.config import StudentConfig
from diffdistill.export import (
    ExportError,
    RecipeWarning,
    export_student,
    load_student,
    read_recipe,
)
from diffdistill.lora import LoraFileError
from diffdistill.pipeline import TeacherLoadError, load_teacher
from diffdistill.sampling import generate
from diffdistill.student import Student, build_student


@pytest.fixture(scope="module")
def sdxl_teacher(tiny_sdxl):
    return load_teacher(tiny_sdxl)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edited_copy(src, dst: Path, file: str, **changes) -> str:
    shutil.copytree(src, dst)
    path = dst / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(dst)


# -- SDXL: prompts, CFG, sampling against StableDiffusionXLPipeline -------------------------------------------
def test_sdxl_prompt_encoding_matches_stock_pipeline(sdxl_teacher, sdxl_pipe, one_thread):
    embeds, neg, pooled, neg_pooled = sdxl_pipe.encode_prompt(TINY_PROMPTS, device="cpu", num_images_per_prompt=1,
                                                              do_classifier_free_guidance=True)
    cond, uncond = sdxl_teacher.encode_prompt(TINY_PROMPTS), sdxl_teacher.empty_cond(2)
    assert cond.embeds.shape == (2, 77, 64) and cond.extra["text_embeds"].shape == (2, 16)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.extra["text_embeds"], pooled)
    assert torch.equal(cond.pooled(), pooled)  # discriminator heads see SDXL's own pooled embedding
    # force_zeros_for_empty_prompt: CFG's unconditional branch is zeros, with the same micro-conditioning
    assert torch.equal(uncond.embeds, neg) and torch.equal(uncond.extra["text_embeds"], neg_pooled)
    assert not uncond.embeds.any() and torch.equal(uncond.extra["time_ids"], cond.extra["time_ids"])
    ref_ids = sdxl_pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, 16)
    assert torch.equal(cond.extra["time_ids"], ref_ids.repeat(2, 1))


def test_sdxl_empty_prompt_is_encoded_without_force_zeros(tiny_sdxl, tmp_path, one_thread):
    path = _edited_copy(tiny_sdxl, tmp_path / "nozeros", "model_index.json", force_zeros_for_empty_prompt=False)
    teacher, pipe = load_teacher(path), StableDiffusionXLPipeline.from_pretrained(path)
    _, neg, _, neg_pooled = pipe.encode_prompt(TINY_PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
    uncond = teacher.empty_cond(2)
    assert neg.abs().sum() > 0 and torch.allclose(uncond.embeds, neg, atol=1e-6)
    assert torch.allclose(uncond.extra["text_embeds"], neg_pooled, atol=1e-6)  # one "" encoded vs a batch of two


@pytest.mark.parametrize("scheduler,steps,guidance", [("euler", 10, 3.0), ("ddim", 4, 1.0)])
def test_sdxl_teacher_sampler_reproduces_stock_pipeline(tiny_sdxl, sdxl_teacher, scheduler, steps, guidance, one_thread):
    """Our Euler ODE step is DDIM (eta 0), which is also exactly diffusers' EulerDiscreteScheduler: the
    pipeline's own scheduler and DDIM are both references."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "ddim":  # DDIM's defaults clip x0 to [-1, 1]; SD's shipped DDIM configs turn that off
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    ours = generate(sdxl_teacher, TINY_PROMPTS, num_steps=steps, guidance=guidance,
                    generator=torch.Generator().manual_seed(0))
    ref = pipe(TINY_PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    diff = (ours - ref).abs().max().item()
    print(f"\nSDXL {scheduler} {steps} steps, guidance {guidance}: max |ours - pipeline| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 3, 16, 16) and diff < 1e-4


def test_teacher_resolution_matches_the_pipelines_height_and_width(tiny_sdxl, tiny_sd3, sdxl_pipe, one_thread):
    """``teacher.resolution`` (SDXL-Turbo's 512 on a 1024 model): latents, SDXL's time_ids and samples are the
    stock pipeline's at ``height = width = resolution``; sizes a denoiser cannot take are refused at load."""
    teacher = load_teacher(tiny_sdxl, resolution=24)
    assert teacher.latent_shape == (4, 12, 12) and teacher.image_size == 24
    assert teacher.encode_prompt(TINY_PROMPTS).extra["time_ids"][0].tolist() == [24, 24, 0, 0, 24, 24]
    ours = generate(teacher, TINY_PROMPTS, num_steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0))
    ref = sdxl_pipe(TINY_PROMPTS, num_inference_steps=4, guidance_scale=3.0, height=24, width=24,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 24, 24) and (ours - ref).abs().max() < 1e-4
    with pytest.raises(TeacherLoadError, match="resolution 25 must be a positive multiple of 2"):
        load_teacher(tiny_sdxl, resolution=25)
    with pytest.raises(TeacherLoadError, match="more than the transformer's pos_embed_max_size 16"):
        load_teacher(tiny_sd3, resolution=40)  # 20 patches a side


def test_sdxl_negative_prompt_matches_stock_pipeline(sdxl_teacher, sdxl_pipe, one_thread):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0}
    ours = generate(sdxl_teacher, TINY_PROMPTS, negative_prompt="a digit 7", guidance=3.0, num_steps=4,
                    generator=torch.Generator().manual_seed(1))
    ref = sdxl_pipe(TINY_PROMPTS, negative_prompt=["a digit 7"] * 2, generator=torch.Generator().manual_seed(1),
                    output_type="pt", **kwargs).images
    zeros = generate(sdxl_teacher, TINY_PROMPTS, num_steps=4, guidance=3.0, generator=torch.Generator().manual_seed(1))
    assert (ours - ref).abs().max() < 1e-4 and (ours - zeros).abs().max() > 1e-3


def test_sdxl_added_conditioning_reaches_the_unet_and_features(sdxl_teacher, one_thread):
    bb = sdxl_teacher.backbone
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = sdxl_teacher.encode_prompt(TINY_PROMPTS)
    other_ids = type(cond)(cond.embeds, {**cond.extra, "time_ids": cond.extra["time_ids"] * 2})
    other_pool = type(cond)(cond.embeds, {**cond.extra, "text_embeds": cond.extra["text_embeds"] + 1})
    with torch.no_grad():
        feats = bb.features(x, 0.5, cond)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"down_0": (2, 32, 4, 4), "down_1": (2, 64, 4, 4),
                                                                 "mid": (2, 64, 4, 4)}
        for changed in (other_ids, other_pool):  # both extra tensors change the prediction and the features
            assert (bb(x, 0.5, changed) - bb(x, 0.5, cond)).abs().max() > 1e-4
            assert (bb.features(x, 0.5, changed)["mid"] - feats["mid"]).abs().max() > 1e-4
        with pytest.raises(ValueError, match=r"needs Cond.extra keys .*missing \[.text_embeds., .time_ids.\]"):
            bb(x, 0.5, type(cond)(cond.embeds))  # the SDXL UNet refuses a conditioning without them


# -- SD3 (rectified flow, MM-DiT) against StableDiffusion3Pipeline ---------------------------------------------
@pytest.fixture(scope="module")
def sd3_teacher(tiny_sd3):
    return load_teacher(tiny_sd3)


def _sd3_pipe(path, **components):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_sd3_encoding(teacher, pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(TINY_PROMPTS, None, None, device="cpu",
                                                         num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond, uncond = teacher.encode_prompt(TINY_PROMPTS), teacher.empty_cond(2)
    assert cond.embeds.shape == (2, 77 + 256, 64) and cond.extra["text_embeds"].shape == (2, 32)
    for ours, ref in ((cond.embeds, embeds), (cond.extra["text_embeds"], pooled), (uncond.embeds, neg),
                      (uncond.extra["text_embeds"], neg_pooled)):
        assert torch.allclose(ours, ref, atol=1e-5)
    return cond


def test_sd3_prompt_encoding_matches_stock_pipeline(tiny_sd3, sd3_teacher, one_thread):
    cond = _check_sd3_encoding(sd3_teacher, _sd3_pipe(tiny_sd3))
    assert cond.embeds[:, 77:].abs().sum() > 0  # T5's tokens follow CLIP's
    assert sd3_teacher.backbone.pred_type == "flow" and sd3_teacher.backbone.schedule.shift == 3.0


def test_sd3_without_t5_matches_stock_pipeline(tiny_sd3, tmp_path, one_thread):
    path = _edited_copy(tiny_sd3, tmp_path / "no-t5", "model_index.json", text_encoder_3=[None, None],
                        tokenizer_3=[None, None])
    teacher = load_teacher(path)
    assert teacher.text_encoder_3 is None
    cond = _check_sd3_encoding(teacher, _sd3_pipe(path, text_encoder_3=None, tokenizer_3=None))
    assert not cond.embeds[:, 77:].any()  # zeros where T5's tokens would be


@pytest.mark.parametrize("steps,guidance", [(10, 3.0)])
def test_sd3_teacher_sampler_reproduces_stock_pipeline(tiny_sd3, sd3_teacher, steps, guidance, one_thread):
    ours = generate(sd3_teacher, TINY_PROMPTS, num_steps=steps, guidance=guidance,
                    generator=torch.Generator().manual_seed(0))
    ref = _sd3_pipe(tiny_sd3)(TINY_PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(0), output_type="pt").images
    diff = (ours - ref).abs().max().item()
    print(f"\nSD3 {steps} steps, guidance {guidance}: max |ours - pipeline| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 3, 16, 16) and diff < 1e-4


def test_sd3_features_are_patch_maps(sd3_teacher, one_thread):
    bb = sd3_teacher.backbone
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = sd3_teacher.encode_prompt(TINY_PROMPTS)
    with torch.no_grad():
        feats = bb.features(x, 0.5, cond)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"block_0": (2, 32, 8, 8), "block_1": (2, 32, 8, 8),
                                                                 "mid": (2, 32, 8, 8)}
        assert torch.equal(feats["mid"], feats["block_1"])  # "mid": the block at half depth (of 2)
        assert bb.feature_levels() == ("block_0", "block_1")  # one per block: the default discriminator heads
        first = bb.features(x, 0.5, cond, levels=("block_0",))
        assert torch.equal(first["block_0"], feats["block_0"])
        moved = bb.features(x, 0.5, type(cond)(cond.embeds, {"text_embeds": cond.extra["text_embeds"] + 1}))
        assert (moved["block_0"] - feats["block_0"]).abs().max() > 1e-4  # the pooled projection conditions it
        with pytest.raises(ValueError, match=r"missing \[.text_embeds.\]"):
            bb(x, 0.5, type(cond)(cond.embeds))


# -- SDXL exports in stock diffusers ---------------------------------------------------------------------------
def _ours(teacher, student, seed=7, global_seed=None):
    """Our sampler drawing as the pipelines do: initial latents from ``generator``, then the re-noising from the
    same generator (SD / SDXL) or, with ``global_seed``, from torch's global RNG (SD3's pipeline does not pass
    its generator to the scheduler's step)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(TINY_PROMPTS), *teacher.latent_shape), generator=g)
    uncond = teacher.empty_cond(len(TINY_PROMPTS)) if student.cfg_scale > 1 else None
    cond = teacher.encode_prompt(TINY_PROMPTS)
    if global_seed is not None:
        torch.manual_seed(global_seed)
    latents = student.generate(noise, cond, uncond, generator=g if global_seed is None else None)
    return (teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)


def _stock(pipe, student, seed=7, global_seed=None, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    if global_seed is not None:
        torch.manual_seed(global_seed)
    kwargs = kwargs or {"num_inference_steps": len(student.timesteps)}
    return pipe(TINY_PROMPTS, guidance_scale=student.guidance, generator=torch.Generator().manual_seed(seed),
                output_type="pt", **kwargs).images


def _perturbed(teacher, kind, guidance, **kw):
    student = build_student(teacher, StudentConfig(kind=kind, timesteps=[1.0, 0.75, 0.5, 0.25], guidance=guidance, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.named_parameters_to_train().values():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return student


def _without_adapter(student):
    """The same sampling recipe on the frozen base (adapters off): what the LoRA must move away from."""
    return Student(student.backbone, None, student.timesteps, student.guidance)


def test_sdxl_full_student_exports_as_an_sdxl_pipeline(sdxl_teacher, tmp_path, one_thread):
    student = _perturbed(sdxl_teacher, "full", guidance=2.0)
    out = export_student(sdxl_teacher, student, tmp_path / "full")
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.config.force_zeros_for_empty_prompt
    ours, theirs = _ours(sdxl_teacher, student), _stock(pipe, student)
    diff = (ours - theirs).abs().max().item()
    print(f"\nSDXL full student, 4 steps, guidance 2: max |ours - stock pipeline| = {diff:.2e}")
    assert diff < 1e-4
    assert (ours - _ours(sdxl_teacher, build_student(sdxl_teacher, StudentConfig(kind="full", guidance=2.0,
            timesteps=student.timesteps)))).abs().mean() > 1e-2  # not trivially the teacher
    t2, s2 = load_student(out)  # the folder's own SDXL components around the student
    assert t2.pipeline_class == "StableDiffusionXLPipeline" and (_ours(t2, s2) - ours).abs().max() < 1e-5


def test_sdxl_lora_student_loads_with_load_lora_weights(tiny_sdxl, tmp_path, one_thread):
    teacher = load_teacher(tiny_sdxl)  # a fresh copy: the adapter must not land on the shared teacher
    student = _perturbed(teacher, "lora", guidance=1.0, lora_rank=4, lora_alpha=2.0)
    out = export_student(teacher, student, tmp_path / "lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = LCMScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.load_lora_weights(str(out))
    ours = _ours(teacher, student)
    diff = (ours - _stock(pipe, student)).abs().max().item()
    print(f"\nSDXL LoRA student, 4 steps: max |ours - stock pipeline + load_lora_weights| = {diff:.2e}")
    assert diff < 1e-4 and (_ours(teacher, _without_adapter(student)) - ours).abs().mean() > 1e-2
    t2, s2 = load_student(out)
    assert (_ours(t2, s2) - ours).abs().max() < 1e-6


# -- SD3 exports in stock diffusers (FlowMatchEulerDiscreteScheduler, stochastic sampling) ----------------------
def test_sd3_full_student_exports_as_an_sd3_pipeline(sd3_teacher, tmp_path, one_thread):
    from diffusers import FlowMatchEulerDiscreteScheduler

    student = _perturbed(sd3_teacher, "full", guidance=2.0)
    out = export_student(sd3_teacher, student, tmp_path / "full")
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.scheduler.config.stochastic_sampling
    assert read_recipe(out)["scheduler"]["default_call_reproduces"]
    assert "torch.manual_seed" in (out / "README.md").read_text()  # the card says how to reproduce the re-noising
    ours, theirs = _ours(sd3_teacher, student, global_seed=11), _stock(pipe, student, global_seed=11)
    diff = (ours - theirs).abs().max().item()
    print(f"\nSD3 full student, 4 steps, guidance 2: max |ours - stock pipeline| = {diff:.2e}")
    assert diff < 1e-4 and pipe.scheduler.sigmas.tolist()[:-1] == pytest.approx(student.timesteps, abs=1e-6)
    plain = DiffusionPipeline.from_pretrained(str(out))  # the same pipeline, deterministic Euler: not our sampler
    plain.scheduler = FlowMatchEulerDiscreteScheduler.from_config(plain.scheduler.config, stochastic_sampling=False)
    assert (_stock(plain, student, global_seed=11) - ours).abs().max() > 1e-3
    student.timesteps = [1.0, 0.8, 0.3]  # non-uniform: exact only with the call's sigmas=
    with pytest.warns(RecipeWarning, match=r"sigmas=\[1.0, 0.8, 0.3\]"):
        out = export_student(sd3_teacher, student, tmp_path / "uneven")
    assert "sigmas=[1.0, 0.8, 0.3]" in (out / "README.md").read_text()
    theirs = _stock(DiffusionPipeline.from_pretrained(str(out)), student, global_seed=12, sigmas=[1.0, 0.8, 0.3])
    assert (_ours(sd3_teacher, student, global_seed=12) - theirs).abs().max() < 1e-4


def test_sd3_lora_student_loads_with_load_lora_weights(tiny_sd3, tmp_path, one_thread):
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = load_teacher(tiny_sd3)
    student = _perturbed(teacher, "lora", guidance=1.0, lora_rank=4, lora_alpha=2.0)
    out = export_student(teacher, student, tmp_path / "lora")
    pipe = _sd3_pipe(tiny_sd3)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.load_lora_weights(str(out))
    ours = _ours(teacher, student, global_seed=13)
    diff = (ours - _stock(pipe, student, global_seed=13)).abs().max().item()
    print(f"\nSD3 LoRA student, 4 steps: max |ours - stock pipeline + load_lora_weights| = {diff:.2e}")
    assert diff < 1e-4 and (_ours(teacher, _without_adapter(student), global_seed=13) - ours).abs().mean() > 1e-3
    t2, s2 = load_student(out)
    assert (_ours(t2, s2, global_seed=13) - ours).abs().max() < 1e-6


# -- mismatches caught at set-up --------------------------------------------------------------------------------
def test_a_lora_from_another_backbone_is_refused(tiny_sd, tiny_sdxl, tmp_path, one_thread):
    sd = load_teacher(tiny_sd)
    out = export_student(sd, _perturbed(sd, "lora", guidance=1.0, lora_rank=4), tmp_path / "sd-lora")
    with pytest.raises(ExportError, match=r"trained on a StableDiffusionPipeline\) cannot load onto .*cross_attention_dim: base 64 vs LoRA's training base 32"):
        load_student(out, base=tiny_sdxl)
    sdxl = load_teacher(tiny_sdxl)
    with pytest.raises(LoraFileError, match=r"does not fit this model .*width .*another backbone"):
        lora.load_lora(sdxl.backbone.denoiser, "student", out / lora.LORA_WEIGHT_NAME)
    assert lora.adapter_names(sdxl.backbone.denoiser) == []  # refused before anything was attached


def test_a_full_student_from_another_backbone_is_refused(tiny_sd, tiny_sdxl, tiny_sd3, tmp_path, one_thread):
    sd = load_teacher(tiny_sd)
    out = export_student(sd, build_student(sd, StudentConfig(kind="full")), tmp_path / "sd-full")
    with pytest.raises(ExportError, match=r"\(StableDiffusionPipeline\) does not fit the teacher .*\(StableDiffusionXL"
                       r"Pipeline\).*cross_attention_dim: student 32 vs teacher 64; addition_embed_type"):
        load_student(out, base=tiny_sdxl)
    with pytest.raises(ExportError, match=r"has no transformer/, the denoiser of the teacher .*StableDiffusion3"):
        load_student(out, base=tiny_sd3)


def test_latent_channel_mismatch_is_named(sdxl_teacher):
    bb = sdxl_teacher.backbone
    bb.check_compatible(bb.signature())
    with pytest.raises(ValueError, match=r"latent_channels: student 4 vs teacher 16"):
        bb.check_compatible({**bb.signature(), "latent_channels": 16})


def test_inconsistent_pipelines_are_refused_at_load(tiny_sdxl, tmp_path):
    as_sd = _edited_copy(tiny_sdxl, tmp_path / "a", "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(TeacherLoadError, match="cross_attention_dim is 64 but its text encoders give 32"):
        load_teacher(as_sd)
    no_te = _edited_copy(tiny_sdxl, tmp_path / "b", "model_index.json", text_encoder_2=[None, None])
    with pytest.raises(TeacherLoadError, match="has no text_encoder_2"):
        load_teacher(no_te)
