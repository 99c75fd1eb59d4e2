"""Configs: typed sections, overrides, and errors that name the dotted key before any model loads."""

from pathlib import Path

import pytest

from diffdistill.config import ConfigError, dump_config, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "objective:\n  name: regression\n"


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.max_steps=7", "student.timesteps=[1.0, 0.6, 0.3]",
                                               "objective.guidance=3", "student.kind=lora"])
    assert cfg.train.max_steps == 7 and cfg.student.timesteps == [1.0, 0.6, 0.3]
    assert cfg.objective.guidance == 3.0 and isinstance(cfg.objective.guidance, float)
    assert cfg.student.kind == "lora" and type(cfg.objective).name == "regression"
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("overrides,key,message", [
    (["train.max_stpes=3"], "train.max_stpes", "did you mean 'train.max_steps'"),
    (["train.max_steps=0"], "train.max_steps", "must be positive"),
    (["train.max_steps=ten"], "train.max_steps", "expected an integer"),
    (["train.lr=true"], "train.lr", "expected a number"),
    (["student.lora_rank=0"], "student.lora_rank", "must be positive"),
    (["student.timesteps=[0.5, 0.9]"], "student.timesteps", "strictly decreasing"),
    (["student.guidance=0.5"], "student.guidance", ">= 1"),
    (["objective.guidance=0"], "objective.guidance", ">= 1"),
    (["objective.name=dmd3"], "objective.name", "unknown objective"),
    (["objective.teacher_stpes=3"], "objective.teacher_stpes", "did you mean 'objective.teacher_steps'"),
    (["teacher.path="], "teacher.path", "expected a string"),
    (["trian.max_steps=3"], "trian", "did you mean 'train'"),
    (["data.prompts=missing.txt"], "data.prompts", "does not exist"),
])
def test_bad_values_name_the_key(tmp_path, overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, BASE), overrides)
    assert info.value.key == key


def test_missing_objective_name(tmp_path):
    with pytest.raises(ConfigError, match="objective.name"):
        load_config(_write(tmp_path, "train:\n  max_steps: 3\n"))


def test_missing_teacher_fails_before_loading_models(tmp_path, monkeypatch):
    """A bad teacher path is reported by the loader's first check (no weights are read)."""
    from diffdistill import pipeline
    from diffdistill.trainer import Trainer

    calls = []
    monkeypatch.setattr(pipeline, "schedule_and_prediction", lambda *a: calls.append(a))
    cfg = load_config(_write(tmp_path, BASE), [f"teacher.path={tmp_path / 'nowhere'}",
                                               f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(pipeline.TeacherLoadError, match="does not exist"):
        Trainer(cfg)
    assert not calls and not (tmp_path / "run" / "checkpoints").exists()


def test_every_shipped_config_loads(monkeypatch):
    """Each YAML under configs/ parses and validates (names, types, cross-section checks) as shipped."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # their relative paths (prompt files) are from the repository root
    paths = sorted((root / "configs").rglob("*.yaml"))
    assert len(paths) >= 12
    for path in paths:
        cfg = load_config(path)
        assert cfg.train.output_dir.startswith("runs/"), path


def test_ho_salimans_guidance_is_converted_at_load(tmp_path):
    """A published (1 + w) cond - w uncond weight, written with its tag, becomes the diffusers scale w + 1."""
    text = "objective:\n  name: dmd2\n  real_guidance: !ho_salimans 0.75\n  gan_weight: 0\n  disc_weight: 0\n"
    cfg = load_config(_write(tmp_path, text))
    assert cfg.objective.real_guidance == 1.75
    assert "ho_salimans" not in dump_config(cfg)  # the resolved config holds the converted number
    cfg = load_config(_write(tmp_path, BASE), ["objective.guidance=!ho_salimans 7"])
    assert cfg.objective.guidance == 8.0
    with pytest.raises(ConfigError, match="takes a number"):
        load_config(_write(tmp_path, BASE), ["objective.guidance=!ho_salimans seven"])
    with pytest.raises(ConfigError, match="w must be >= 0"):
        load_config(_write(tmp_path, BASE), ["objective.guidance=!ho_salimans -1"])
    lcm = load_config(Path(__file__).resolve().parents[1] / "configs" / "lcm" / "sd15_lora.yaml").objective
    assert (lcm.w_min, lcm.w_max) == (6.0, 16.0)  # diffusers' LCM-LoRA script: w ~ U[5, 15] in that form


def test_diffusers_scale_w_plus_1_is_ho_salimans_w(tiny_teacher):
    """The conversion is right for our maths: backbone.cfg at scale w + 1 = (1 + w) eps(cond) - w eps(uncond)."""
    import torch

    bb, w = tiny_teacher.backbone, 0.75
    x = torch.randn(2, *tiny_teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, uncond = tiny_teacher.encode_prompt(["a handwritten digit 3"] * 2), tiny_teacher.empty_cond(2)
    with torch.no_grad():
        ours = bb.cfg(x, 0.6, cond, uncond, w + 1.0, out="eps")
        ho_salimans = (1 + w) * bb(x, 0.6, cond, out="eps") - w * bb(x, 0.6, uncond, out="eps")
    assert torch.allclose(ours, ho_salimans, atol=1e-5)
