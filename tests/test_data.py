"""The embedded dataset: real digits, a balanced, disjoint, reproducible split; captions."""

import json

import torch

from diffdistill import data


def test_split_is_balanced_disjoint_and_reproducible(tmp_path):
    s = data.split_indices()
    assert len(s["held_in"]) == 4000 and len(s["held_out"]) == 1000
    assert not set(s["held_in"]) & set(s["held_out"])
    assert s == data.split_indices()
    held_out = data.load_split("held_out")
    assert held_out.images.shape == (1000, 3, 32, 32)
    assert torch.bincount(held_out.labels).tolist() == [100] * 10
    assert held_out.images.min() == -1 and held_out.images.max() == 1
    assert torch.equal(held_out.images[:, 0], held_out.images[:, 2])  # grey replicated to RGB
    assert (held_out.images[:, :, :2] == -1).all()  # the 2-pixel padding is background
    manifest = data.write_manifest(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["held_out"]["indices"] == s["held_out"]
    assert manifest["held_in"]["per_digit"] == [400] * 10


def test_committed_manifest_matches_the_code():
    from pathlib import Path

    committed = json.loads((Path(__file__).parents[1] / "assets" / "data" / "manifest.json").read_text())
    s = data.split_indices()
    assert committed["held_in"]["indices"] == s["held_in"] and committed["held_out"]["indices"] == s["held_out"]


def test_captions():
    assert data.caption(7, "a handwritten digit {d}") == "a handwritten digit 7"
    assert data.caption(7, "the number {w}") == "the number seven"
    assert len(data.TRAIN_TEMPLATES) >= 8 and not set(data.TRAIN_TEMPLATES) & set(data.EVAL_TEMPLATES)
    prompts, labels = data.eval_prompts(3)
    assert len(prompts) == 30 and labels[:3] == [0, 0, 0] and "zero" in prompts[1] + prompts[2]
    caps = data.random_captions([1] * 1000, torch.Generator().manual_seed(0), p_empty=0.1)
    assert 50 < caps.count("") < 150
