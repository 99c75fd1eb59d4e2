"""The embedded digits evaluator: a tiny open_clip CLIP (ModifiedResNet image tower, transformer text
tower) trained contrastively on the held-in real digits only (``trainers/train_evaluator.py``).

It never sees generated images and shares no weights with the teacher. It gives the ``digits``
protocol its image features (FID, diversity), CLIP score, and zero-shot prompt accuracy.
Input images: ``(B, 3, H, W)`` in ``[-1, 1]``; other sizes are resized to 32x32 (bilinear, antialiased).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import DIGIT_WORDS, EVAL_TEMPLATES, IMAGE_SIZE, caption

MODEL_NAME = "digits-clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "assets" / "evaluators" / MODEL_NAME

MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32,
                   "patch_size": None},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def build_model(config: dict = MODEL_CONFIG):
    """A random-init open_clip model from ``config`` (registered under the name ``digits-clip``)."""
    import tempfile

    import open_clip

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as d:
        Path(d, f"{MODEL_NAME}.json").write_text(json.dumps(config))
        open_clip.add_model_config(d)
        root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly": weights are loaded next
        try:
            model = open_clip.create_model(MODEL_NAME, pretrained=None)
        finally:
            root.setLevel(level)
    return model


def load_model_folder(path: str | Path, config_file: str, weights_file: str, build, what: str, script: str):
    """``build(config)`` with the float32 weights of a folder holding ``config_file`` (JSON) and ``weights_file``
    (safetensors); a missing file is named, with the ``script`` that re-creates it."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in (config_file, weights_file):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{what} incomplete: {path / f} is missing (re-create it with {script})")
    model = build(json.loads((path / config_file).read_text()))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in load_file(str(path / weights_file)).items()})
    return model


def save_model_folder(path: str | Path, config_file: str, weights_file: str, config: dict, model, metadata=None,
                      half: bool = False) -> None:
    """The inverse of :func:`load_model_folder`: ``config`` as JSON, ``model``'s weights as safetensors (floating
    tensors in fp16 when ``half``), ``metadata`` as the file's string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / config_file).write_text(json.dumps(config, indent=1))
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(path / weights_file), metadata={k: str(v) for k, v in (metadata or {}).items()})


class DigitsEvaluator:
    """Loaded evaluator: ``image_features``, ``text_features``, ``classify``."""

    def __init__(self, model, device="cpu"):
        import open_clip

        self.model = model.eval().requires_grad_(False).to(device)
        # the standard CLIP BPE, truncated to the text tower's context length
        self.tokenizer = open_clip.get_tokenizer("RN50", context_length=model.context_length)
        self.device = torch.device(device)
        self._class_emb = None

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH, device="cpu") -> DigitsEvaluator:
        return cls(load_model_folder(path, CONFIG_FILE, WEIGHTS_FILE, build_model, "digits evaluator",
                                     "trainers/train_evaluator.py"), device)

    def save(self, path: str | Path, config: dict = MODEL_CONFIG, metadata: dict | None = None) -> None:
        # fp16 on disk (half the size; the features are computed in fp32 after loading)
        save_model_folder(path, CONFIG_FILE, WEIGHTS_FILE, config, self.model, metadata, half=True)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                   antialias=True, align_corners=False)
        return images.float()

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, normalize: bool = False, batch_size: int = 500) -> torch.Tensor:
        """``(B, 64)`` image embeddings (unnormalised unless asked)."""
        out = []
        for chunk in self.prepare(images).split(batch_size):
            out.append(self.model.encode_image(chunk.to(self.device), normalize=normalize).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=normalize).float().cpu()

    def class_embeddings(self, templates: Sequence[str] = EVAL_TEMPLATES) -> torch.Tensor:
        """``(10, 64)`` unit class embeddings: the mean of each digit's template embeddings."""
        emb = torch.stack([self.text_features([caption(d, t) for t in templates]).mean(0)
                           for d in range(len(DIGIT_WORDS))])
        return F.normalize(emb, dim=-1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot digit predictions ``(B,)``: argmax of cosine similarity to the class embeddings."""
        if self._class_emb is None:
            self._class_emb = self.class_embeddings()
        return (self.image_features(images, normalize=True) @ self._class_emb.T).argmax(-1)
