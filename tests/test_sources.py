"""Training inputs: prompt files, real-image sources (digits, folders, webdataset shards) and per-sample
batches that do not depend on how the global batch is split."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill import sources
from diffdistill.batch import micro_batch
from diffdistill.config import ConfigError, load_config


def _png(color, size=(40, 24)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = color
    arr[:, : size[0] // 2, 1] = 255  # left half green: the centre crop must keep the middle
    return Image.fromarray(arr)


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, ext, caption in samples:
            buf = io.BytesIO()
            image.save(buf, format="PNG" if ext == "png" else "JPEG")
            payload = {ext: buf.getvalue(),
                       "txt" if isinstance(caption, str) else "json":
                           (caption if isinstance(caption, str) else json.dumps(caption)).encode()}
            for e, data in payload.items():
                info = tarfile.TarInfo(f"{key}.{e}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert sources.load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert sources.load_prompts(str(tmp_path / "p.jsonl"), "text") == ["x", "y"]
    with pytest.raises(KeyError, match="no column 'caption'"):
        sources.load_prompts(str(tmp_path / "p.jsonl"))
    assert len(sources.load_prompts("digits")) == 100


def test_image_folder_metadata_and_sidecars(tmp_path):
    _png(10).save(tmp_path / "a.png")
    _png(200).save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "red-ish"}\n')
    (tmp_path / "b.txt").write_text("brighter\n")
    _png(50).save(tmp_path / "no_caption.png")  # neither in metadata nor with a sidecar: not a sample
    src = sources.load_images(str(tmp_path), size=16)
    assert len(src) == 2
    img, cap = src[0]
    assert cap == "red-ish" and img.shape == (3, 16, 16) and -1 <= img.min() and img.max() <= 1
    assert abs(float(img[0].mean()) - (10 / 127.5 - 1)) < 1e-2  # red channel value kept
    assert float(img[1, :, :6].mean()) > 0.9 and float(img[1, :, -6:].mean()) < -0.9  # centre-cropped square
    assert src[1][1] == "brighter"
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(KeyError, match="'caption'"):
        sources.load_images(str(tmp_path), size=16)


def test_webdataset_shards_local_braces_and_refusals(tmp_path):
    _tar(tmp_path / "s-000.tar", [("k0", _png(10), "png", "first"), ("k1", _png(90), "jpg", {"caption": "second"})])
    _tar(tmp_path / "s-001.tar", [("dir/k2", _png(170), "png", "third")])
    src = sources.load_images(str(tmp_path / "s-{000..001}.tar"), size=8)
    assert [src[i][1] for i in range(len(src))] == ["first", "second", "third"]
    assert src[2][0].shape == (3, 8, 8)
    assert sources.expand_braces("a/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar"]
    with pytest.raises(ValueError, match="pipe:"):
        sources.load_images("pipe:curl -s http://x/s.tar", size=8)
    with pytest.raises(ValueError, match="only local paths, https"):
        sources.load_images("http://example.com/s.tar", size=8)
    with pytest.raises(FileNotFoundError, match="s-002.tar"):
        sources.load_images(str(tmp_path / "s-{001..002}.tar"), size=8)
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(ValueError, match="not a readable tar"):
        sources.load_images(str(tmp_path / "bad.tar"), size=8)


def test_config_refuses_pipe_and_missing_image_sources(tmp_path):
    with pytest.raises(ConfigError, match="data.images.*pipe"):
        load_config(None, ["objective.name=regression", "data.images=pipe:cat x.tar"])
    with pytest.raises(ConfigError, match="data.images"):
        load_config(None, ["objective.name=regression", f"data.images={tmp_path / 'missing'}"])


def test_digit_images_are_held_in_only():
    from diffdistill.data import load_split

    src = sources.load_images("digits", size=32)
    held_in = {tuple(x.flatten()[::7].tolist()) for x in load_split("held_in").images[:, 0]}
    for i in range(0, len(src), 397):
        assert tuple(src[i][0][0].flatten()[::7].tolist()) in held_in
    assert len(src) == 4000


def test_batches_do_not_depend_on_how_the_global_batch_is_split():
    pool = [f"p{i}" for i in range(50)]
    images = sources.load_images("digits", size=32)
    whole = micro_batch(pool, 4, seed=3, step=7, images=images)
    halves = [micro_batch(pool, 2, seed=3, step=7, rank=r, world=2, images=images) for r in range(2)]
    micro = [micro_batch(pool, 1, seed=3, step=7, micro=m, rank=r, world=2, images=images)
             for m in range(2) for r in range(2)]  # micro-step m of rank r holds global index 2m + r
    noise = whole.randn(3, 2)  # generators are stateful: draw once, compare each split's first draw
    for parts in (halves, micro):
        assert [p for b in parts for p in b.prompts] == whole.prompts
        assert torch.equal(torch.cat([b.images for b in parts]), whole.images)
        assert [c for b in parts for c in b.image_captions] == whole.image_captions
        assert torch.equal(torch.cat([b.randn(3, 2) for b in parts]), noise)
    other = micro_batch(pool, 4, seed=3, step=8, images=images)
    assert other.prompts != whole.prompts and not torch.equal(other.randn(3, 2), noise)
