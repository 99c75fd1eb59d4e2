"""Teacher loading and sampling against stock diffusers' StableDiffusionPipeline, the reference."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROMPTS
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffdistill.pipeline import TeacherLoadError, load_teacher, sampling_grid
from diffdistill.sampling import generate, sample_ode


def _stock(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fixture,native", [("tiny_sd", "eps"), ("tiny_sd_v", "v")])
@pytest.mark.parametrize("steps,guidance", [(10, 3.0), (4, 1.0)])
def test_teacher_sampler_reproduces_stock_pipeline(request, fixture, native, steps, guidance):
    path = request.getfixturevalue(fixture)
    teacher = load_teacher(path)
    assert teacher.backbone.pred_type == native
    ours = generate(teacher, TINY_PROMPTS, num_steps=steps, guidance=guidance,
                    generator=torch.Generator().manual_seed(0))
    ref = _stock(path)(TINY_PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    assert (ours - ref).abs().max() < 1e-4


def test_negative_prompt_matches_stock_pipeline(tiny_sd, tiny_teacher):
    ours = generate(tiny_teacher, TINY_PROMPTS, num_steps=4, guidance=3.0, negative_prompt="a digit 7",
                    generator=torch.Generator().manual_seed(1))
    ref = _stock(tiny_sd)(TINY_PROMPTS, negative_prompt=["a digit 7"] * 2, generator=torch.Generator().manual_seed(1),
                          output_type="pt", num_inference_steps=4, guidance_scale=3.0).images
    plain = generate(tiny_teacher, TINY_PROMPTS, num_steps=4, guidance=3.0, generator=torch.Generator().manual_seed(1))
    assert (ours - ref).abs().max() < 1e-4 and (ours - plain).abs().max() > 1e-3


def test_latents_match_stock_pipeline(tiny_sd, tiny_teacher):
    pipe = _stock(tiny_sd)
    ref = pipe(TINY_PROMPTS, num_inference_steps=8, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
               output_type="latent").images
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    cond = tiny_teacher.encode_prompt(TINY_PROMPTS)
    ours = sample_ode(tiny_teacher.backbone, noise, cond, sampling_grid(tiny_teacher, 8),
                      uncond=tiny_teacher.empty_cond(2), guidance=5.0)
    assert (ours - ref).abs().max() < 1e-4


def test_prompt_encoding_and_vae_match_stock_pipeline(tiny_sd, tiny_teacher):
    pipe = _stock(tiny_sd)
    ref, neg = pipe.encode_prompt(TINY_PROMPTS, "cpu", 1, True, negative_prompt=None)
    assert torch.allclose(tiny_teacher.encode_prompt(TINY_PROMPTS).embeds, ref)
    assert torch.allclose(tiny_teacher.empty_cond(2).embeds, neg)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = tiny_teacher.encode_images(images, sample=False)
    z_ref = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert z.shape == (2, 4, 8, 8) and torch.allclose(z, z_ref, atol=1e-6)
    assert torch.allclose(tiny_teacher.decode_latents(z), pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample,
                          atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_teacher.encode_images(torch.zeros(2, 1, 16, 16))


def test_encode_prompt_encodes_each_distinct_prompt_once(tiny_sd, monkeypatch):
    teacher = load_teacher(tiny_sd)
    seen = []
    encode = type(teacher.family).encode
    monkeypatch.setattr(type(teacher.family), "encode", lambda self, t, ps: seen.append(list(ps)) or encode(self, t, ps))
    prompts = ["a digit 3", "a digit 7", "a digit 3", ""]
    first = teacher.encode_prompt(prompts)
    again = teacher.encode_prompt(["a digit 7", "a digit 9"])
    assert seen == [["a digit 3", "a digit 7", ""], ["a digit 9"]]  # distinct, in order; cached ones skipped
    plain = encode(teacher.family, teacher, prompts)
    assert torch.allclose(first.embeds, plain.embeds, atol=1e-6) and torch.equal(again.embeds[0], first.embeds[1])
    first.embeds.zero_()  # callers get their own tensors, not the cache's
    assert torch.equal(teacher.encode_prompt("a digit 3").embeds[0], plain.embeds[0])
    teacher.PROMPT_CACHE_BYTES = 2 * again.select(0).nbytes  # room for two: least recently used dropped
    teacher.encode_prompt(["a digit 1", "a digit 2"])
    assert [p for p, _ in teacher._prompts] == ["a digit 1", "a digit 2"]
    teacher.to(dtype=torch.float32)  # moving the encoders drops the cache
    assert not teacher._prompts


def test_prompt_cache_benchmark_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / "bench_prompt_cache.py"
    spec = importlib.util.spec_from_file_location("bench_prompt_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--batches", "2", "--batch-size", "4"])
    assert "2 batches of 4 digit prompts: text encoder every call" in capsys.readouterr().out


def test_teacher_is_frozen(tiny_teacher):
    for module in (tiny_teacher.backbone, tiny_teacher.text_encoder, tiny_teacher.vae):
        assert not any(p.requires_grad for p in module.parameters())


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="no model_index.json"):
        load_teacher(str(tmp_path / "empty"))
    with pytest.raises(TeacherLoadError, match="not a local folder"):
        load_teacher("no-such-owner-xyz/no-such-model")  # offline in tests: fails fast, names the id


def _copy_with(src, tmp_path, edit_file, **changes):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    path = dst / edit_file
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return str(dst)


def test_unsupported_prediction_type_is_named(tiny_sd, tmp_path):
    path = _copy_with(tiny_sd, tmp_path, "scheduler/scheduler_config.json", prediction_type="banana")
    with pytest.raises(TeacherLoadError, match="unsupported prediction_type 'banana'"):
        load_teacher(path)


def test_unsupported_pipeline_is_named(tiny_sd, tmp_path):
    path = _copy_with(tiny_sd, tmp_path, "model_index.json", _class_name="KandinskyPipeline")
    with pytest.raises(TeacherLoadError, match="is a KandinskyPipeline"):
        load_teacher(path)


def test_teacher_vae_replaces_the_pipelines_and_force_upcast_keeps_fp32(tiny_sd, tiny_sdxl, tiny_sd3, tmp_path):
    """teacher.vae: a VAE folder of its own, or a pipeline folder's vae/, in place of the teacher's (same latent
    channels, else refused); a force_upcast VAE (SDXL's) stays float32 beside a float16 teacher, as diffusers'
    pipelines upcast it."""
    from diffusers import AutoencoderKL

    from diffdistill.pipeline import TeacherLoadError, load_teacher

    torch.manual_seed(5)
    other = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sd, subfolder="vae"))  # fresh random weights
    other.save_pretrained(tmp_path / "vae")
    teacher = load_teacher(tiny_sd, vae=str(tmp_path / "vae"))
    assert teacher.vae_source == str(tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(teacher.vae.state_dict().values(), other.state_dict().values()))
    sdxl_vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    from_pipeline = load_teacher(tiny_sd, vae=tiny_sdxl)
    assert all(torch.equal(a, b) for a, b in zip(from_pipeline.vae.state_dict().values(), sdxl_vae.state_dict().values()))
    with pytest.raises(TeacherLoadError, match="latent channels"):
        load_teacher(tiny_sd, vae=tiny_sd3)  # SD3's 16-channel VAE
    with pytest.raises(TeacherLoadError, match="teacher.vae"):
        load_teacher(tiny_sd, vae=str(tmp_path / "no-such-vae"))
    half = load_teacher(tiny_sdxl, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert half.to(dtype=torch.float16).vae.dtype == torch.float32
    assert load_teacher(tiny_sdxl, dtype=torch.bfloat16).vae.dtype == torch.bfloat16  # bf16 does not overflow


def test_teacher_vae_reaches_the_run_and_its_export(tiny_sd, tmp_path, one_thread):
    from diffusers import AutoencoderKL

    from diffdistill.config import load_config
    from diffdistill.export import export_student, read_recipe
    from diffdistill.trainer import Trainer

    torch.manual_seed(6)
    AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sd, subfolder="vae")).save_pretrained(tmp_path / "vae")
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "regression.yaml"
    trainer = Trainer(load_config(tiny, [f"teacher.path={tiny_sd}", f"teacher.vae={tmp_path / 'vae'}",
                                         f"train.output_dir={tmp_path / 'run'}"]))
    assert trainer.teacher.vae_source == str(tmp_path / "vae")
    out = export_student(trainer.teacher, trainer.student, tmp_path / "export", config=trainer.cfg)
    assert read_recipe(out)["vae"] == str(tmp_path / "vae")
    exported = AutoencoderKL.from_pretrained(out, subfolder="vae")  # the full export ships the VAE it trained with
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trainer.teacher.vae.state_dict().values()))
