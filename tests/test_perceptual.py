"""LPIPS through the lpips package with safetensors weights only, and the regression loss that uses it (DMD eq. 9,
DMD2's SDXL ODE pre-training)."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TINY

from diffdistill.config import load_config
from diffdistill.perceptual import LPIPSWeightsError, build_lpips, load_lpips
from diffdistill.trainer import Trainer


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory) -> str:
    """Random LPIPS-VGG weights in the layout of lpips.LPIPS(net="vgg").state_dict() (the real ones need a
    download): the loading path is the real one."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = build_lpips()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) * 0.1)  # the linear layers are non-negative in the published weights
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_model(model, str(path))
    return str(path)


def test_lpips_loads_only_safetensors_and_says_what_to_download(lpips_weights, tmp_path):
    from safetensors.torch import load_file

    model = load_lpips(lpips_weights)
    saved = load_file(lpips_weights)
    state = model.state_dict()
    assert len(saved) > 30 and all(torch.equal(v, state[k]) for k, v in saved.items())
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(model(x, x).abs().max()) == 0.0 and (model(x, x.flip(0)) > 0).all()
    with pytest.raises(LPIPSWeightsError, match="convert them once"):
        load_lpips(tmp_path / "missing.safetensors")
    with pytest.raises(LPIPSWeightsError, match="objective.lpips_weights"):
        load_lpips(None)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LPIPSWeightsError, match="not an LPIPS-VGG state dict"):
        load_lpips(tmp_path / "other.safetensors")


def test_regression_with_lpips_is_the_perceptual_distance_of_the_decoded_pair(tiny_sd, tmp_path, lpips_weights,
                                                                              monkeypatch, one_thread):
    trainer = Trainer(load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={tmp_path / 'r'}",
                                         "objective.loss=lpips", f"objective.lpips_weights={lpips_weights}",
                                         "objective.teacher_steps=2", "student.timesteps=[1.0]"]))
    obj = trainer.objective
    seen = {}
    real_pairs = obj.batch_pairs

    def spy(batch):
        seen["pairs"] = real_pairs(batch)
        return seen["pairs"]

    monkeypatch.setattr(obj, "batch_pairs", spy)
    out = trainer.phase_loss("student", trainer.micro_batch(0, batch_size=2))
    assert set(out.terms) == {"regression_lpips"}
    prompts, z, x0 = seen["pairs"]
    with torch.no_grad():  # independently: the student's one-step sample and the teacher's, decoded, under LPIPS
        pred = trainer.student(z, 1.0, trainer.teacher.encode_prompt(prompts), out="x0")
        decode = trainer.teacher.decode_latents
        want = load_lpips(lpips_weights)(decode(pred).float(), decode(x0).float()).mean()
    assert torch.allclose(out.total.detach(), want, rtol=1e-5)
    out.total.backward()  # and it trains the student: gradients reach its weights through the VAE decoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.groups["student"].values())
