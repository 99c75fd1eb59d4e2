"""The teacher trainer: runs end to end on tiny settings, writes a loadable SD folder, and a resumed run
equals an uninterrupted one exactly."""

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _trainer():
    spec = importlib.util.spec_from_file_location("train_teacher", ROOT / "trainers" / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp, name, steps, work=None):
    out, work = tmp / name, work or tmp / f"{name}-work"
    _trainer().main(["--out", str(out), "--work", str(work), "--vae-steps", "2", "--steps", str(steps),
                     "--vae-batch", "4", "--batch", "4", "--checkpoint-every", "1", "--warmup", "2"])
    return out, work


def test_resumed_training_equals_uninterrupted(tmp_path):
    straight, _ = _run(tmp_path, "straight", steps=3)
    _, work = _run(tmp_path, "first", steps=2)
    resumed, _ = _run(tmp_path, "resumed", steps=3, work=work)  # same work dir: resumes at step 2
    for sub in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(straight / sub)), load_file(str(resumed / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub

    from diffdistill.pipeline import load_teacher

    teacher = load_teacher(str(resumed))  # our loader takes it as an SD1.5 checkpoint
    assert teacher.backbone.pred_type == "eps" and teacher.latent_shape == (4, 8, 8)
    assert teacher.pipeline_class == "StableDiffusionPipeline"


def test_asset_scripts_import_and_parse_their_arguments(capsys):
    """The scripts of trainers/README.md's re-creation recipe load and show their options (an import that
    moved breaks them before any training starts)."""
    import pytest

    for path in (ROOT / "trainers" / "train_teacher.py", ROOT / "trainers" / "train_evaluator.py",
                 ROOT / "trainers" / "train_digit_classifier.py", ROOT / "eval" / "digits_teacher.py",
                 ROOT / "eval" / "digits_student.py"):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        assert done.value.code == 0 and "--out" in capsys.readouterr().out, path
