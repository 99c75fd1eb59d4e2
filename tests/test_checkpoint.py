"""Safetensors training state: optimizer round trip, atomic writes, EMA."""

import pytest
import torch

from diffdistill.checkpoint import load_optimizer, load_state, optimizer_tensors, save_state
from diffdistill.ema import EMA


def _trained(steps=3, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(steps):
        net(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def test_optimizer_round_trip_continues_identically(tmp_path):
    net, opt = _trained()
    tensors, meta = optimizer_tensors(opt)
    save_state(tmp_path / "s.safetensors", {**tensors, **{f"net.{k}": v for k, v in net.state_dict().items()}},
               {"optimizer": meta, "step": 3})
    loaded, meta2 = load_state(tmp_path / "s.safetensors")
    assert meta2["step"] == 3 and not list(tmp_path.glob("*.tmp"))
    net2, opt2 = _trained(steps=0, seed=1)
    net2.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("net.")})
    load_optimizer(opt2, loaded, meta2["optimizer"])
    x = torch.randn(16, 4)
    for n, o in ((net, opt), (net2, opt2)):
        n(x).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_load_state_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a diffdistill checkpoint"):
        load_state(tmp_path / "foreign.safetensors")


def test_ema_tracks_with_warmup():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    start = ema.shadow["weight"].clone()
    ema.update(net)  # warm-up decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], d * start + (1 - d) * torch.ones(1, 2))
    for _ in range(200):
        ema.update(net)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.ones(1, 2), atol=1e-6)
    with pytest.raises(ValueError):
        EMA(net, decay=1.0)


def test_checkpoint_files_are_readable_by_others_and_flushed(tmp_path, monkeypatch):
    import os
    import stat

    import torch

    from diffdistill import checkpoint as ckpt

    flushed = []
    real = ckpt.fsync_path
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: (flushed.append(str(p)), real(p)))
    folder = ckpt.write_checkpoint(tmp_path, 3, {"param.x": torch.ones(2)}, {"step": 3}, "a: 1\n", keep=2)
    for name in (ckpt.STATE_FILE, "config.yaml", ckpt.MARKER):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o644, name
    root = str(ckpt.checkpoints_dir(tmp_path))
    assert root in flushed and any(p.endswith(ckpt.MARKER) for p in flushed)
    assert flushed.index(root) == len(flushed) - 1  # the rename reached the disk last, before any pruning
