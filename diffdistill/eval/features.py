"""Feature extractors for FID and CLIP score, behind one interface, and a cache of reference statistics.

Convention: every extractor is called on images ``(B, 3, H, W)`` as float tensors in ``[-1, 1]`` (the
evaluator's and the VAE's range) and returns ``(B, D)`` float32 features on the CPU. Extractors whose
reference implementation reads image files (clean-fid, open_clip's PIL preprocessing) first round the
images to uint8, exactly as saving them to PNG would, so a tensor and its PNG give the same features.

* :class:`CleanFIDInception`: clean-fid's Inception-V3 (Parmar et al. 2022, "On Aliased Resizing and
  Surprising Subtleties in GAN Evaluation"), ``mode="clean"``: PIL bicubic resize to 299 in float.
  Only from a weights file already on disk; nothing is ever downloaded.
* :class:`OpenClipFeatures`: any open_clip model (Cherti et al. 2023), from a pretrained tag found in
  the local Hugging Face cache, a local ``.safetensors`` checkpoint, or random init (``pretrained=None``).
* :class:`DigitsFeatures`: the embedded digits evaluator (:mod:`diffdistill.eval.evaluator`).

:func:`reference_stats` caches ``(mu, sigma)`` of reference images as safetensors under
``$DIFFDISTILL_CACHE`` (default ``~/.cache/diffdistill``), keyed by protocol, extractor and resize.
"""

from __future__ import annotations

import abc
import hashlib
import os
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .metrics import gaussian_stats

INCEPTION_FILE = "inception-2015-12-05.pt"  # the file name clean-fid's InceptionV3W loads
CACHE_ENV = "DIFFDISTILL_CACHE"


# -- images --------------------------------------------------------------------------------------
def check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"expected float images (B, 3, H, W) in [-1, 1], got {shape}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"expected images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(images in [0, 255] must be scaled: x / 127.5 - 1)")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, H, W, 3)`` uint8, rounded as a saved PNG would be."""
    x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(arrays: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 arrays of one size -> ``(B, 3, H, W)`` in ``[-1, 1]`` (exact inverse of :func:`to_uint8`)."""
    return torch.from_numpy(np.stack(list(arrays))).permute(0, 3, 1, 2).float() / 127.5 - 1


def _crop_resize_pil(img, size: int | None):
    """Centre crop to a square on the shorter side, then PIL LANCZOS to ``size`` (GigaGAN / DMD2's
    ``CenterCropLongEdge`` + ``resize(..., Image.LANCZOS)``; offsets rounded as torchvision's ``center_crop``)."""
    from PIL import Image

    if size is None:
        return img
    w, h = img.size
    s = min(w, h)
    left, top = round((w - s) / 2.0), round((h - s) / 2.0)
    img = img.crop((left, top, left + s, top + s))
    return img if img.size == (size, size) else img.resize((size, size), Image.LANCZOS)


def center_crop_resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Generated images through the same uint8 -> crop -> LANCZOS path as the reference files."""
    from PIL import Image

    check_images(images)
    if size is None:
        return images
    return from_uint8([np.asarray(_crop_resize_pil(Image.fromarray(a), size)) for a in to_uint8(images)])


def load_image_files(paths: Sequence[str | Path], size: int | None) -> torch.Tensor:
    """Image files -> ``(B, 3, size, size)`` in ``[-1, 1]`` (RGB, centre crop, LANCZOS)."""
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(_crop_resize_pil(img.convert("RGB"), size)))
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images of different sizes cannot be batched without a resize (size=None): {paths[:3]}...")
    return from_uint8(arrays)


# -- the interface -------------------------------------------------------------------------------
class FeatureExtractor(abc.ABC):
    """``extractor(images)``: ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, D)`` float32 CPU features.
    ``name`` identifies the features in cache keys and reports."""

    name: str
    batch_size: int = 64

    @abc.abstractmethod
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """One batch (already checked) -> ``(B, D)`` features."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return torch.cat([self.features(chunk).float().cpu() for chunk in images.split(self.batch_size)])


# -- (a) clean-fid Inception ---------------------------------------------------------------------
def cleanfid_weights_folder() -> Path:
    """The folder clean-fid downloads its Inception weights into and loads them from
    (``cleanfid.features.feature_extractor``: the current folder on Windows, ``/tmp`` elsewhere)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


class CleanFIDInception(FeatureExtractor):
    """clean-fid's ``torchscript_inception`` in ``mode="clean"``: 2048-d pool features of uint8 images
    resized to 299x299 by clean-fid's own PIL-bicubic float resizer. ``folder`` holds
    ``inception-2015-12-05.pt`` (default: clean-fid's own folder, :func:`cleanfid_weights_folder`)."""

    name = "clean-fid-inception"

    def __init__(self, folder: str | Path | None = None, device="cpu", batch_size: int = 32):
        from cleanfid.downloads_helper import inception_url

        folder = cleanfid_weights_folder() if folder is None else Path(folder).expanduser()
        if not (folder / INCEPTION_FILE).is_file():
            raise FileNotFoundError(
                f"clean-fid's Inception weights {INCEPTION_FILE} are not in {folder.resolve()}. diffdistill never "
                f"downloads them: fetch {inception_url} on a machine with internet and place the file in "
                f"{folder.resolve()} (clean-fid's cache folder), or pass folder=DIR holding {INCEPTION_FILE}.")
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.device = torch.device(device)
        self.model = InceptionV3W(str(folder), download=False, resize_inside=False).eval().to(self.device)
        self.resize = build_resizer("clean")
        self.batch_size = batch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        resized = np.stack([self.resize(a) for a in to_uint8(images)])  # (B, 299, 299, 3) float in [0, 255]
        return self.model(torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device))


# -- (b) open_clip --------------------------------------------------------------------------------
def _safetensors_name(filename: str) -> str:
    """The safetensors twin open_clip looks for first on the hub (``open_clip.pretrained``)."""
    if filename in ("", "open_clip_pytorch_model.bin"):
        return "open_clip_model.safetensors"
    stem, ext = os.path.splitext(filename)
    return filename if ext == ".safetensors" else stem + ".safetensors"


def resolve_open_clip_weights(model_name: str, pretrained: str | Path | None,
                              cache_dir: str | Path | None = None) -> str | None:
    """A local ``.safetensors`` file for ``pretrained`` (a tag of ``model_name``, looked up only in the
    local Hugging Face cache, or a file path), or ``None`` for random init. Never downloads."""
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache

    if pretrained is None:
        return None
    cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if not cfg:
        path = Path(pretrained).expanduser()
        if not (path.suffix or path.exists() or os.sep in str(pretrained)):
            raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of open_clip model {model_name!r};"
                             f" its tags: {open_clip.list_pretrained_tags_by_model(model_name)}")
        if not path.is_file():
            raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
        if path.suffix != ".safetensors":
            raise ValueError(f"open_clip checkpoint {path} is not .safetensors; diffdistill loads safetensors only "
                             "(convert it once: safetensors.torch.save_file(state_dict, 'model.safetensors'))")
        return str(path)
    repo, filename = os.path.split(cfg.get("hf_hub", "").rstrip())
    if not repo:
        raise FileNotFoundError(f"open_clip tag {model_name}/{pretrained} is only published at {cfg.get('url')!r}; "
                                "download it elsewhere, convert it to .safetensors and pass its path as pretrained=")
    safe = _safetensors_name(filename)
    hit = try_to_load_from_cache(repo, safe, cache_dir=None if cache_dir is None else str(cache_dir))
    if isinstance(hit, str):
        return hit
    raise FileNotFoundError(
        f"open_clip weights {model_name}/{pretrained} are not on this machine: expected {safe} of the Hugging Face "
        f"repo {repo} in the cache {cache_dir or constants.HF_HUB_CACHE}. diffdistill never downloads them: run "
        f"`hf download {repo} {safe}` where there is internet and copy the cache, or pass pretrained=PATH.safetensors.")


def _source_id(pretrained, weights: str | None, is_tag: bool) -> str:
    """``random``, the tag, or a local file's stem plus a digest of its path and size (two files
    named alike must not share cached reference statistics)."""
    if pretrained is None or is_tag:
        return "random" if pretrained is None else str(pretrained)
    path = Path(weights).resolve()
    digest = hashlib.sha256(f"{path}:{path.stat().st_size}".encode()).hexdigest()[:8]
    return f"{path.stem}-{digest}"


class OpenClipFeatures(FeatureExtractor):
    """Image and text embeddings of an open_clip model. Images go through the model's own PIL
    preprocessing (``create_model_and_transforms``' validation transform) after rounding to uint8."""

    def __init__(self, model_name: str, pretrained: str | Path | None = None, device="cpu", batch_size: int = 64,
                 cache_dir: str | Path | None = None):
        import open_clip

        weights = resolve_open_clip_weights(model_name, pretrained, cache_dir)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained)) if pretrained is not None else {}
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"))
        self.device = torch.device(device)
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"open_clip-{model_name}-{_source_id(pretrained, weights, bool(tag_cfg))}"
        self.batch_size = batch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        batch = torch.stack([self.preprocess(Image.fromarray(a)) for a in to_uint8(images)])
        return self.model.encode_image(batch.to(self.device))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self(images)
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenizer(list(prompts[i:i + self.batch_size])).to(self.device),
                                      normalize=normalize).float().cpu()
               for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(out)


# -- (c) the embedded digits evaluator ------------------------------------------------------------
class DigitsFeatures(FeatureExtractor):
    """The embedded digits evaluator's 64-d image embeddings (float images, no uint8 rounding: the
    ``digits`` protocol has always fed it tensors) and its text embeddings."""

    name = "digits-clip"

    def __init__(self, evaluator=None, batch_size: int = 500):
        from .evaluator import DigitsEvaluator

        self.evaluator = evaluator or DigitsEvaluator.load()
        self.batch_size = batch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.image_features(images)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        check_images(images)
        return self.evaluator.image_features(images, normalize=normalize)

    def text_features(self, prompts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        return self.evaluator.text_features(prompts, normalize=normalize)


# -- reference statistics cache ------------------------------------------------------------------
def cache_root() -> Path:
    """``$DIFFDISTILL_CACHE``, else ``~/.cache/diffdistill``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffdistill").expanduser()


def reference_stats_path(protocol: str, extractor: str, resize: int | None) -> Path:
    key = "--".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)) for part in
                    (protocol, extractor, "native" if resize is None else f"res{resize}"))
    return cache_root() / "reference_stats" / f"{key}.safetensors"


def reference_stats(protocol: str, extractor: str, resize: int | None, compute_features: Callable[[], object],
                    fingerprint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of the reference features: loaded from the cache if present, else
    ``compute_features()`` (``(N, D)``) is called once and its Gaussian statistics are saved (float64
    safetensors, written atomically). ``fingerprint`` (e.g. a hash of the reference file list) is
    stored with them; a cached file with another fingerprint is an error, never silently reused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = reference_stats_path(protocol, extractor, resize)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint", "") != fingerprint:
                raise ValueError(f"cached reference statistics {path} were computed from another reference set "
                                 f"(fingerprint {meta.get('fingerprint')!r}, now {fingerprint!r}); delete the file "
                                 "to recompute them")
            return f.get_tensor("mu").numpy(), f.get_tensor("sigma").numpy()
    feats = compute_features()
    mu, sigma = gaussian_stats(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"mu": torch.from_numpy(mu).contiguous(), "sigma": torch.from_numpy(sigma).contiguous()}, str(tmp),
              metadata={"protocol": protocol, "extractor": extractor, "resize": str(resize),
                        "num_images": str(len(feats)), "fingerprint": fingerprint})
    os.replace(tmp, path)
    return mu, sigma
