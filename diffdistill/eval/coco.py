"""COCO captions for the COCO protocols: a pinned selection of (image, caption) pairs from the user's
own captions file, and checks of the user's image folder. COCO itself cannot ship with diffdistill.

The captions file is COCO's ``annotations/captions_val2014.json`` (or ``captions_val2017.json``):
``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}, ...]}``.

Selection (:func:`select_coco_pairs`), identical for every user, platform and library version because it
uses no random number generator, only SHA-256 of integers that COCO itself assigns:

1. Keep the images that have at least one caption.
2. Rank them by ``sha256(f"{seed}:image:{image_id}")`` (hex digest; ties, which do not occur, by id) and
   take the first ``num_images``; return them in ascending ``image_id`` order. For one seed a smaller
   selection is a prefix of the ranking, so the 10K selection lies inside the 30K one.
3. For each selected image take, among its captions, the one with the smallest
   ``sha256(f"{seed}:caption:{annotation_id}")``, with surrounding whitespace stripped.

This is not GigaGAN's or DMD2's prompt list (their files are not redistributable with us); numbers are
comparable to theirs in protocol, not to the digit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class CocoPair:
    image_id: int
    file_name: str
    caption: str


def _rank(seed: int, kind: str, ident: int) -> str:
    return hashlib.sha256(f"{seed}:{kind}:{ident}".encode()).hexdigest()


def read_captions(path: str | Path) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """``({image_id: file_name}, {image_id: [(annotation_id, caption), ...]})`` from a COCO captions JSON,
    with errors that name the missing key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file {path} does not exist (expected e.g. "
                                "annotations/captions_val2014.json from cocodataset.org)")
    data = json.loads(path.read_text())
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path} is not a COCO captions file: it has no top-level {key!r} key "
                             "(expected {'images': [...], 'annotations': [...]})")
    files, captions = {}, {}
    for where, entries, keys in (("images", data["images"], ("id", "file_name")),
                                 ("annotations", data["annotations"], ("id", "image_id", "caption"))):
        for i, entry in enumerate(entries):
            missing = [k for k in keys if k not in entry]
            if missing:
                raise ValueError(f"{path}: {where}[{i}] has no {missing[0]!r} key (each entry needs {keys})")
    for img in data["images"]:
        files[int(img["id"])] = str(img["file_name"])
    for ann in data["annotations"]:
        if int(ann["image_id"]) not in files:
            raise ValueError(f"{path}: annotation {ann['id']} refers to image {ann['image_id']}, absent from 'images'")
        captions.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), str(ann["caption"]).strip()))
    return files, captions


def select_coco_pairs(captions_file: str | Path, num_images: int, seed: int = 0) -> list[CocoPair]:
    """``num_images`` (image, caption) pairs, pinned as described in the module docstring."""
    files, captions = read_captions(captions_file)
    ids = sorted(captions, key=lambda i: (_rank(seed, "image", i), i))
    if num_images > len(ids):
        raise ValueError(f"{captions_file} has {len(ids)} captioned images; {num_images} were asked for")
    pairs = []
    for image_id in sorted(ids[:num_images]):
        _, text = min(captions[image_id], key=lambda a: (_rank(seed, "caption", a[0]), a[0]))
        pairs.append(CocoPair(image_id, files[image_id], text))
    return pairs


def check_image_folder(image_dir: str | Path, file_names: list[str] | None = None) -> list[Path]:
    """The reference image files: ``file_names`` inside ``image_dir`` (all must exist), or with
    ``file_names=None`` every ``.jpg/.jpeg/.png`` in it, sorted by name."""
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {folder} does not exist (expected COCO's val2014/ or "
                                "val2017/ image folder, e.g. from cocodataset.org)")
    if file_names is None:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"reference image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        return paths
    paths = [folder / f for f in file_names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} reference images are missing from {folder}, "
                                f"e.g. {missing[:3]} (is it the image folder of the same COCO split as the captions?)")
    return paths


def fingerprint(paths: list[Path]) -> str:
    """A short hash of the reference file names, stored beside cached statistics."""
    return hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()[:16]
