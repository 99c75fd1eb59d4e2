"""The committed digits evaluator: loads from safetensors, classifies held-out real digits."""

import torch

from diffdistill.data import load_split
from diffdistill.eval.evaluator import DigitsEvaluator


def test_committed_evaluator_classifies_held_out_digits():
    ev = DigitsEvaluator.load()
    held_out = load_split("held_out")
    pick = torch.arange(0, 1000, 4)  # 250 images, 25 per digit
    acc = (ev.classify(held_out.images[pick]) == held_out.labels[pick]).float().mean().item()
    assert acc >= 0.95
    # shuffled labels would score near chance: the accuracy is not an artefact of the metric
    assert (ev.classify(held_out.images[pick]) == held_out.labels[pick].roll(25)).float().mean() < 0.3
    # resizing path: a 64x64 upsampled copy is classified the same way in the vast majority
    big = torch.nn.functional.interpolate(held_out.images[pick], size=64, mode="nearest")
    assert (ev.classify(big) == ev.classify(held_out.images[pick])).float().mean() > 0.9


def test_missing_evaluator_names_the_file(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        DigitsEvaluator.load(tmp_path)
