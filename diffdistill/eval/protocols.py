"""Named evaluation protocols. ``digits``: the embedded teacher's protocol (more land with the harness)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data import eval_prompts, load_split
from . import metrics
from .evaluator import DigitsEvaluator

# sample_fn(prompts, generator) -> images (B, 3, H, W) in [0, 1]
SampleFn = Callable[[Sequence[str], torch.Generator], torch.Tensor]


def digits_protocol(sample_fn: SampleFn, evaluator: DigitsEvaluator | None = None, n_per_digit: int = 100,
                    batch_size: int = 100, seed: int = 0, nfe: int | None = None) -> tuple[dict, torch.Tensor]:
    """``n_per_digit`` images per digit from the held-out caption templates, scored by the embedded
    evaluator: FID against the held-out real split (and the real-vs-real floor: a held-in subset of the
    same size vs held-out), CLIP score, prompt accuracy, diversity (and the real images' diversity).
    Returns (metrics, images in [0, 1])."""
    evaluator = evaluator or DigitsEvaluator.load()
    prompts, labels = eval_prompts(n_per_digit)
    g = torch.Generator().manual_seed(seed)
    images, seconds = [], 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc="digits protocol", leave=False):
        start = time.perf_counter()
        images.append(sample_fn(prompts[i:i + batch_size], g).float().cpu())
        seconds += time.perf_counter() - start
    images = torch.cat(images)
    x = images * 2 - 1
    feats = evaluator.image_features(x)
    held_out, held_in = load_split("held_out"), load_split("held_in")
    real = evaluator.image_features(held_out.images)
    pick = torch.randperm(len(held_in.images), generator=torch.Generator().manual_seed(seed))[:len(x)]
    floor = metrics.fid(evaluator.image_features(held_in.images[pick]), real)
    labels_t = torch.tensor(labels)
    result = {
        "protocol": "digits",
        "num_images": len(x),
        "fid": metrics.fid(feats, real),
        "fid_real_floor": floor,
        "clip_score": metrics.clip_score(evaluator.image_features(x, normalize=True),
                                         evaluator.text_features(prompts)),
        "prompt_accuracy": metrics.prompt_accuracy(evaluator.classify(x), labels_t),
        "diversity": metrics.diversity(feats, labels_t),
        "diversity_real": metrics.diversity(real, held_out.labels),
        "nfe": nfe,
        "ms_per_image": 1000 * seconds / len(x),
    }
    result["fid_ratio_to_floor"] = result["fid"] / floor
    return result, images
