"""Named evaluation protocols: presets as data (:data:`PROTOCOLS`) and the functions that run them.

* ``digits``: the embedded teacher's protocol (:func:`digits_protocol`).
* ``coco2014-30k-256``, ``coco2014-10k-512-clipg``, ``coco2017-5k``: text-to-image on COCO captions
  (:func:`coco_protocol`), on the user's local COCO files (:mod:`diffdistill.eval.coco`).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import eval_prompts, load_split
from . import metrics
from .digit_classifier import DigitClassifier
from .evaluator import DigitsEvaluator

# sample_fn(prompts, generator) -> images (B, 3, H, W) in [0, 1]
SampleFn = Callable[[Sequence[str], torch.Generator], torch.Tensor]


# the two evaluators' prompt accuracies differ by more than this: the report says so
EVALUATORS_DISAGREE = 0.05


def digits_protocol(sample_fn: SampleFn, evaluator: DigitsEvaluator | None = None, n_per_digit: int = 100,
                    batch_size: int = 100, seed: int = 0, nfe: int | None = None,
                    classifier: DigitClassifier | None = None) -> tuple[dict, torch.Tensor]:
    """``n_per_digit`` images per digit from the held-out caption templates, scored by two independent evaluators.
    The embedded CLIP evaluator: FID against the held-out real split (and the real-vs-real floor: a held-in subset
    of the same size vs held-out), CLIP score, prompt accuracy, diversity (and the real images' diversity), and
    improved precision / recall (k = 3) against the held-out real features. The CNN digit classifier
    (``digit_classifier.py``): ``classifier_accuracy`` (overall and per digit) and ``classifier_fd``, the
    Frechet distance in its penultimate features against the held-out split (floor: the same held-in subset);
    ``evaluators_disagree`` when the two accuracies differ by more than :data:`EVALUATORS_DISAGREE`.
    Returns (metrics, images in [0, 1])."""
    evaluator = evaluator or DigitsEvaluator.load()
    classifier = classifier or DigitClassifier.load()
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
    result.update(metrics.precision_recall(real, feats, k=3))
    result.update(classifier_scores(classifier, x, labels_t, held_out, held_in.images[pick]))
    result["evaluators_disagree"] = abs(result["prompt_accuracy"] - result["classifier_accuracy"]) > EVALUATORS_DISAGREE
    return result, images


def classifier_scores(classifier: DigitClassifier, x: torch.Tensor, labels: torch.Tensor, held_out,
                      held_in_pick: torch.Tensor) -> dict:
    """The digit classifier's view of images ``x`` in [-1, 1] prompted with digits ``labels``."""
    pred = classifier.classify(x)
    real = classifier.features(held_out.images)
    return {"classifier_accuracy": metrics.prompt_accuracy(pred, labels),
            "classifier_accuracy_per_digit": metrics.per_class_accuracy(pred, labels, 10),
            "classifier_fd": metrics.fid(classifier.features(x), real),
            "classifier_fd_real_floor": metrics.fid(classifier.features(held_in_pick), real)}


# -- presets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """One evaluation recipe. ``resolution``: both generated and reference images are centre-cropped
    to a square and resized with PIL LANCZOS to it before FID features (``None``: native size).
    ``reference``: ``held_out`` (the digits split), ``folder`` (every image in the user's image folder)
    or ``selected`` (the images of the selected captions). CLIP score = ``clip_score_scale`` x the mean
    cosine between image and ``clip_prefix + caption`` embeddings, images first resized like FID's to
    ``clip_resolution``."""

    name: str
    description: str
    dataset: str  # "digits" | "coco2014" | "coco2017"
    num_images: int
    resolution: int | None
    fid_features: str  # "digits-clip" | "clean-fid-inception"
    reference: str  # "held_out" | "folder" | "selected"
    clip_model: str
    clip_pretrained: str | None = None
    clip_prefix: str = ""
    clip_resolution: int | None = None
    clip_score_scale: float = 1.0
    selection_seed: int = 0
    sources: tuple[str, ...] = ()

    def clip_prompts(self, captions: Sequence[str]) -> list[str]:
        return [self.clip_prefix + c for c in captions]


# Hessel et al. 2021 (CLIPScore, arXiv 2104.08718) prepend this to captions; GigaGAN and DMD2 follow.
CLIP_PREFIX = "A photo depicts "
_COCO_CLIP = {"clip_model": "ViT-g-14", "clip_pretrained": "laion2b_s12b_b42k", "clip_prefix": CLIP_PREFIX,
              "clip_resolution": 256, "clip_score_scale": 1.0, "fid_features": "clean-fid-inception"}

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("digits", "1000 held-out-template prompts (100 per digit) on the embedded digits teacher, scored by "
             "the embedded evaluator (FID vs the held-out real split, CLIP score, prompt accuracy, diversity)",
             dataset="digits", num_images=1000, resolution=None, fid_features="digits-clip", reference="held_out",
             clip_model="digits-clip", sources=("diffdistill/data.py", "diffdistill/eval/evaluator.py")),
    Protocol("coco2014-30k-256", "30K COCO-2014 val captions; FID (clean-fid Inception) against the whole val2014 "
             "folder, both sides centre-cropped and LANCZOS-resized to 256; CLIP score with ViT-g-14 "
             "(laion2b_s12b_b42k) as the mean cosine with 'A photo depicts ' prompts",
             dataset="coco2014", num_images=30_000, resolution=256, reference="folder",
             sources=("GigaGAN, Kang et al. 2023, evaluation/", "DMD2, Yin et al. 2024, main/coco_eval/"), **_COCO_CLIP),
    Protocol("coco2014-10k-512-clipg", "DMD2's SDXL protocol: 10K COCO-2014 val captions; FID against the 10K "
             "selected images, both sides at 512 (centre crop + LANCZOS); CLIP score as coco2014-30k-256",
             dataset="coco2014", num_images=10_000, resolution=512, reference="selected",
             sources=("DMD2, Yin et al. 2024, experiments/sdxl/README.md: --eval_res 512, 10000 samples",),
             **_COCO_CLIP),
    Protocol("coco2017-5k", "All 5K COCO-2017 val images, one caption each; FID against those images at 512 "
             "(centre crop + LANCZOS; our choice, papers differ); CLIP score as coco2014-30k-256",
             dataset="coco2017", num_images=5_000, resolution=512, reference="selected",
             sources=("COCO 2017 val (Lin et al. 2014)",), **_COCO_CLIP),
)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(name, list(PROTOCOLS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown protocol {name!r}{hint} Known protocols: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


# -- COCO ------------------------------------------------------------------------------------------
def _coco_reference(protocol: Protocol, pairs, image_dir) -> list[Path]:
    from .coco import check_image_folder

    if protocol.reference == "folder":
        return check_image_folder(image_dir)
    return check_image_folder(image_dir, [p.file_name for p in pairs])


def _reference_stats(protocol: Protocol, key: str, paths: list[Path], extractor, batch_size: int):
    from .coco import fingerprint
    from .features import load_image_files, reference_stats

    def compute():
        return torch.cat([extractor(load_image_files(paths[i:i + batch_size], protocol.resolution))
                          for i in tqdm(range(0, len(paths), batch_size), desc=f"{key} reference", leave=False)])

    return reference_stats(key, extractor.name, protocol.resolution, compute, fingerprint(paths))


def coco_protocol(sample_fn: SampleFn, name: str, captions_file: str | Path, image_dir: str | Path, *,
                  fid_extractor=None, clip_extractor=None, num_images: int | None = None, batch_size: int = 16,
                  seed: int = 0, nfe: int | None = None, keep_images: int = 64) -> tuple[dict, torch.Tensor]:
    """Run a COCO preset: generate one image per selected caption (``sample_fn`` gets the raw caption),
    FID against the cached reference statistics, CLIP score. Features are computed batch by batch, so
    only the first ``keep_images`` images (in ``[0, 1]``) are kept and returned. Extractors default to
    the preset's (:class:`~diffdistill.eval.features.CleanFIDInception`, ``OpenClipFeatures``)."""
    from .coco import select_coco_pairs
    from .features import CleanFIDInception, OpenClipFeatures, center_crop_resize

    protocol = get_protocol(name)
    if not protocol.dataset.startswith("coco"):
        raise ValueError(f"protocol {name!r} is not a COCO protocol")
    n = num_images or protocol.num_images
    pairs = select_coco_pairs(captions_file, n, protocol.selection_seed)
    reference = _coco_reference(protocol, pairs, image_dir)  # fail on a bad folder before generating
    fid_extractor = fid_extractor or CleanFIDInception()
    clip_extractor = clip_extractor or OpenClipFeatures(protocol.clip_model, protocol.clip_pretrained)
    g = torch.Generator().manual_seed(seed)
    feats, img_emb, txt_emb, kept, seconds = [], [], [], [], 0.0
    for i in tqdm(range(0, n, batch_size), desc=name, leave=False):
        captions = [p.caption for p in pairs[i:i + batch_size]]
        start = time.perf_counter()
        images = sample_fn(captions, g).float().cpu()
        seconds += time.perf_counter() - start
        x = images * 2 - 1
        feats.append(fid_extractor(center_crop_resize(x, protocol.resolution)))
        img_emb.append(clip_extractor.image_features(center_crop_resize(x, protocol.clip_resolution)))
        txt_emb.append(clip_extractor.text_features(protocol.clip_prompts(captions)))
        kept.append(images[:max(0, keep_images - sum(len(k) for k in kept))])
    key = name if n == protocol.num_images or protocol.reference == "folder" else f"{name}-n{n}"
    mu_ref, sigma_ref = _reference_stats(protocol, key, reference, fid_extractor, batch_size)
    result = {
        "protocol": name, "num_images": n, "num_reference_images": len(reference),
        "fid": metrics.frechet_distance(*metrics.gaussian_stats(torch.cat(feats)), mu_ref, sigma_ref),
        "clip_score": metrics.clip_score(torch.cat(img_emb), torch.cat(txt_emb), scale=protocol.clip_score_scale),
        "prompt_accuracy": None, "diversity": None, "nfe": nfe, "ms_per_image": 1000 * seconds / n,
        "fid_features": fid_extractor.name, "clip_features": clip_extractor.name,
    }
    return result, torch.cat(kept)
