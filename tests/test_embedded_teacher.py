"""The committed digits teacher: stock diffusers loads and samples it offline, and the samples are the
digits they were asked for (so a broken asset fails CI)."""

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffdistill.config import EMBEDDED_TEACHER
from diffdistill.data import eval_prompts
from diffdistill.eval.evaluator import DigitsEvaluator
from diffdistill.pipeline import load_teacher
from diffdistill.sampling import generate


def _stock():
    pipe = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_TEACHER), torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_diffusers_samples_the_requested_digits():
    pipe = _stock()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.scheduler.config.prediction_type == "epsilon"
    prompts, labels = eval_prompts(3)  # held-out caption templates, 3 per digit
    images = pipe(prompts, num_inference_steps=25, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (30, 3, 32, 32)
    predicted = DigitsEvaluator.load().classify(images * 2 - 1)
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.9, f"prompt accuracy {accuracy:.2f}: {predicted.tolist()}"


def test_our_loader_sees_an_sd15_checkpoint_and_matches_stock():
    teacher = load_teacher(str(EMBEDDED_TEACHER))
    assert teacher.backbone.pred_type == "eps" and teacher.latent_shape == (4, 8, 8)
    assert teacher.pipeline_class == "StableDiffusionPipeline"
    ours = generate(teacher, ["the numeral 4 written by hand"] * 2, num_steps=10, guidance=2.0,
                    generator=torch.Generator().manual_seed(1))
    ref = _stock()(["the numeral 4 written by hand"] * 2, num_inference_steps=10, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert (ours - ref).abs().max() < 1e-4
