"""Architecture configs of the real teachers the shipped recipes name: for each hub id, the JSON configs of its
pipeline (``model_index.json``, the scheduler's, and every model's ``config.json``) as published on the hub, in
the layout of a diffusers pipeline folder, without weights or tokenizer files. Facts about architectures, used
to build those teachers on the meta device offline (``load_teacher(..., weights=False)``, ``diffdistill
plan``); never to load weights. Where each file was copied from: ``SOURCES.md`` beside this file."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# hub id -> the folder of its configs here
KNOWN: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
    "facebook/dinov2-small": "dinov2-small",  # ADD's pixel discriminator network (a model folder, not a pipeline)
}


def folder(hub_id: str) -> Path | None:
    """The config folder shipped for ``hub_id``, or None."""
    name = KNOWN.get(hub_id)
    return None if name is None else HERE / name


def model_config(path: str) -> dict:
    """The ``config.json`` of a single model: a local folder's own, else the one shipped for that hub id."""
    import json

    local = Path(path) / "config.json"
    found = local if local.is_file() else (folder(path) / "config.json" if folder(path) is not None else None)
    if found is None or not found.is_file():
        raise FileNotFoundError(f"{path!r}: not a local model folder, and no architecture config is shipped for "
                                f"it (known: {', '.join(KNOWN)})")
    return json.loads(found.read_text())
