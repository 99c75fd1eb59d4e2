"""The second digits evaluator: a small CNN digit classifier, trained on the held-in real digits only
(``trainers/train_digit_classifier.py``), independent of the CLIP evaluator (``evaluator.py``) and of the teacher.

The CLIP evaluator reads a digit from its overall shape and text similarity; it is lenient where distillation
fails, on stroke-level structure (broken or thin strokes, a 3 that reads as a 5). This classifier is trained with
labels only, so it must read the strokes. It gives the ``digits`` protocol ``classifier_accuracy`` (the prompted
digit, overall and per digit) and ``classifier_fd``, a Frechet distance in its penultimate features against the
held-out real digits.

Input images: ``(B, 3, H, W)`` in ``[-1, 1]`` (the channels are averaged to grey); other sizes are resized to
32x32 (bilinear, antialiased), as for the CLIP evaluator.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IMAGE_SIZE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "assets" / "evaluators" / "digits-cnn"
MODEL_CONFIG = {"channels": [32, 64], "features": 128, "classes": 10}


class DigitCNN(nn.Module):
    """Two stages of two 3x3 convolutions and a 2x2 max-pool (32 -> 16 -> 8 pixels), a ``features``-wide
    penultimate layer, ``classes`` logits."""

    def __init__(self, channels=(32, 64), features: int = 128, classes: int = 10):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(channels)
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, features), nn.ReLU())
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.penultimate(self.body(x))  # (B, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, classes)


def build_model(config: dict = MODEL_CONFIG) -> DigitCNN:
    return DigitCNN(tuple(config["channels"]), config["features"], config["classes"])


class DigitClassifier:
    """Loaded classifier: ``features`` (penultimate, for the Frechet distance), ``logits``, ``classify``."""

    def __init__(self, model: DigitCNN, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH, device="cpu") -> DigitClassifier:
        from .evaluator import load_model_folder

        return cls(load_model_folder(path, CONFIG_FILE, WEIGHTS_FILE, build_model, "digit classifier",
                                     "trainers/train_digit_classifier.py"), device)

    def save(self, path: str | Path, config: dict = MODEL_CONFIG, metadata: dict | None = None) -> None:
        from .evaluator import save_model_folder

        save_model_folder(path, CONFIG_FILE, WEIGHTS_FILE, config, self.model, metadata)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 1, 32, 32)`` grey."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        grey = images.float().mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            grey = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                 align_corners=False)
        return grey

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn, batch_size: int) -> torch.Tensor:
        return torch.cat([fn(chunk.to(self.device)).float().cpu() for chunk in self.prepare(images).split(batch_size)])

    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """``(B, features)`` penultimate activations."""
        return self._run(images, self.model.features, batch_size)

    def logits(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        return self._run(images, self.model, batch_size)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B,)`` predicted digits."""
        return self.logits(images).argmax(-1)
