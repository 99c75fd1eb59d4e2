"""Training inputs: prompt sources and real-image sources.

Prompts (``data.prompts``): ``digits`` (every training caption of the embedded dataset), a ``.txt``
file (one prompt per line), or a ``.csv`` / ``.jsonl`` file with a caption column.

Real images (``data.images``, for objectives that use them, e.g. a GAN term):

* ``digits`` -- the embedded dataset's held-in split (never the held-out one), with random training
  captions.
* an image folder -- ``*.png|jpg|jpeg|webp`` with captions in ``metadata.jsonl`` / ``metadata.csv``
  (``file_name`` + the caption column, as in Hugging Face's imagefolder) or in a sibling ``NAME.txt``.
* webdataset shards -- ``.tar`` files given as a local path, a brace pattern
  (``shards/{000000..000099}.tar``), or ``https://`` / ``s3://`` URLs (copied once into the cache
  folder, then read locally). Each sample is the tar members sharing a key: an image plus a ``.txt``
  (or ``.json`` with the caption column). ``pipe:`` URLs are refused: they run shell commands.

Images are centre-cropped and resized (PIL, bicubic) to the teacher's resolution, scaled to [-1, 1].
Every source is random access: ``source.pick(generator)`` draws one ``(image, caption)``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from .data import TRAIN_TEMPLATES, caption, load_split

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


# -- prompts ---------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_prompts(spec: str, caption_column: str = "caption") -> list[str]:
    """A prompt pool from ``spec`` (see the module docstring)."""
    if spec == "digits":
        return [caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {spec!r} does not exist")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".csv", ".jsonl"):
        rows = _rows(path)
        if rows and caption_column not in rows[0]:
            raise KeyError(f"{spec}: no column {caption_column!r}; it has {sorted(rows[0])} "
                           "(set data.caption_column)")
        prompts = [str(row[caption_column]) for row in rows]
    else:
        raise ValueError(f"prompt file {spec!r}: expected .txt, .csv or .jsonl")
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompts")
    return prompts


# -- images ----------------------------------------------------------------------------------------
def to_tensor(image, size: int) -> torch.Tensor:
    """A PIL image -> ``(3, size, size)`` in [-1, 1]: centre crop to a square, bicubic resize."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        image = image.resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


class ImageSource:
    """Random access ``(image, caption)`` pairs; subclasses implement ``__len__`` and ``__getitem__``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        raise NotImplementedError

    def pick(self, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        return self[int(torch.randint(len(self), (1,), generator=generator))]


class DigitImages(ImageSource):
    """The embedded held-in digits (the held-out split is for evaluation only)."""

    def __init__(self, size: int):
        split = load_split("held_in")
        self.images, self.labels = split.images, split.labels
        if size != self.images.shape[-1]:
            self.images = torch.nn.functional.interpolate(self.images, size=(size, size), mode="bicubic",
                                                          align_corners=False).clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.images[i], caption(int(self.labels[i]), TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)])

    def pick(self, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        i = int(torch.randint(len(self), (1,), generator=generator))
        template = TRAIN_TEMPLATES[int(torch.randint(len(TRAIN_TEMPLATES), (1,), generator=generator))]
        return self.images[i], caption(int(self.labels[i]), template)


class ImageFolder(ImageSource):
    def __init__(self, folder: str | Path, size: int, caption_column: str = "caption"):
        self.root, self.size = Path(folder), size
        captions = self._metadata(caption_column)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        self.items = []
        for f in files:
            rel = f.relative_to(self.root).as_posix()
            if rel in captions:
                self.items.append((f, captions[rel]))
            elif f.with_suffix(".txt").is_file():
                self.items.append((f, f.with_suffix(".txt").read_text().strip()))
        if not self.items:
            raise ValueError(f"image folder {folder}: no images with captions (metadata.jsonl / metadata.csv with "
                             f"file_name and {caption_column!r}, or NAME.txt beside each image)")

    def _metadata(self, column: str) -> dict[str, str]:
        for name in ("metadata.jsonl", "metadata.csv"):
            path = self.root / name
            if path.is_file():
                rows = _rows(path)
                if rows and ("file_name" not in rows[0] or column not in rows[0]):
                    raise KeyError(f"{path}: needs columns 'file_name' and {column!r}; it has {sorted(rows[0])}")
                return {r["file_name"]: str(r[column]) for r in rows}
        return {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path, text = self.items[i]
        with Image.open(path) as im:
            return to_tensor(im, self.size), text


def expand_braces(spec: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``[a/000.tar, a/001.tar, a/002.tar]`` (zero padding kept); nested patterns too."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m is None:
        return [spec]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    return [x for n in range(int(lo), int(hi) + 1)
            for x in expand_braces(spec[:m.start()] + str(n).zfill(width) + spec[m.end():])]


def _cache_dir() -> Path:
    return Path(os.environ.get("DIFFDISTILL_CACHE", Path.home() / ".cache" / "diffdistill")) / "shards"


def fetch_shard(url: str) -> Path:
    """A local path for shard ``url``: local files as they are; https/s3 copied once into the cache."""
    if url.startswith("pipe:"):
        raise ValueError(f"refusing webdataset URL {url!r}: 'pipe:' runs a shell command; give a local path "
                         "or an https:// / s3:// URL")
    if "://" not in url:
        if not Path(url).is_file():
            raise FileNotFoundError(f"webdataset shard {url!r} does not exist")
        return Path(url)
    scheme = url.split("://", 1)[0]
    if scheme not in ("https", "s3"):
        raise ValueError(f"webdataset URL {url!r}: only local paths, https:// and s3:// are allowed")
    dest = _cache_dir() / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".tar")
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    if scheme == "https":
        import urllib.request

        with urllib.request.urlopen(url) as r, tmp.open("wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    else:
        try:
            import fsspec

            with fsspec.open(url, "rb") as r, tmp.open("wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except ImportError as e:  # fsspec present, s3fs missing
            raise ImportError(f"reading {url!r} needs s3fs: pip install s3fs") from e
    tmp.rename(dest)
    return dest


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/abc.seg.png`` -> key ``dir/abc``, extension ``seg.png``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDatasetShards(ImageSource):
    """Samples of webdataset ``.tar`` shards, indexed once (member offsets) for random access."""

    def __init__(self, spec: str, size: int, caption_column: str = "caption"):
        from tqdm.auto import tqdm

        self.size, self.column = size, caption_column
        urls = [u for part in spec.split("::") for u in expand_braces(part)]
        self.items: list[tuple[Path, tarfile.TarInfo, tarfile.TarInfo]] = []
        for url in tqdm(urls, desc="indexing shards", disable=len(urls) < 4):
            path = fetch_shard(url)
            try:
                with tarfile.open(path) as tar:
                    members: dict[str, dict[str, tarfile.TarInfo]] = {}
                    for m in tar.getmembers():
                        if m.isfile():
                            key, ext = _split_key(m.name)
                            members.setdefault(key, {})[ext] = m
            except tarfile.TarError as e:
                raise ValueError(f"webdataset shard {url!r} is not a readable tar file: {e}") from e
            for parts in members.values():
                image = next((parts[e] for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
                text = parts.get("txt") or parts.get("json")
                if image is not None and text is not None:
                    self.items.append((path, image, text))
        if not self.items:
            raise ValueError(f"webdataset {spec!r}: no samples with an image and a .txt/.json caption")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        path, image, text = self.items[i]
        with tarfile.open(path) as tar:
            raw = tar.extractfile(image).read()
            meta = tar.extractfile(text).read().decode("utf-8")
        cap = meta.strip() if text.name.endswith(".txt") else str(json.loads(meta)[self.column])
        with Image.open(io.BytesIO(raw)) as im:
            return to_tensor(im, self.size), cap


def load_images(spec: str | None, size: int, caption_column: str = "caption") -> ImageSource | None:
    """The image source named by ``data.images`` (``None``: the run uses no real images)."""
    if spec is None:
        return None
    if spec == "digits":
        return DigitImages(size)
    if spec.startswith("pipe:") or ".tar" in spec or "://" in spec:
        return WebDatasetShards(spec, size, caption_column)
    if Path(spec).is_dir():
        return ImageFolder(spec, size, caption_column)
    raise FileNotFoundError(f"image source {spec!r}: not 'digits', an existing folder, or .tar shards")
