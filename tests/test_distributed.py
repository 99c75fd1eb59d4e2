"""Several processes (gloo on CPU, launched by torchrun) train the same model as one process with the
same global batch: gradients are averaged by DDP in every phase."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill import checkpoint as ckpt
from diffdistill.config import load_config
from diffdistill.objectives import OBJECTIVES
from diffdistill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "regression.yaml"
TWO_PHASE = "objective={name: two_phase_test, critic_every: 2}"


def _params(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load_state(ckpt.complete_checkpoints(run)[0] / ckpt.STATE_FILE)
    return {k: v for k, v in tensors.items() if k.startswith(("param.", "ema."))}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _torchrun(overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_worker.py"), str(TINY), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


EXTRA = {"regression": [], "two_phase_test": [TWO_PHASE],
         "dmd2": ["objective={name: dmd2, student_every: 2, gan_weight: 0.1, disc_weight: 1.0}", "data.images=digits",
                  "student.timesteps=[1.0, 0.5]"]}


@pytest.mark.parametrize("objective", list(EXTRA))
def test_two_processes_equal_one_process(tiny_sd, tmp_path, monkeypatch, one_thread, objective):
    from test_trainer import TwoPhase

    monkeypatch.setitem(OBJECTIVES, "two_phase_test", TwoPhase)
    extra = EXTRA[objective]
    # Adam's eps = 1 keeps the update Lipschitz in the gradient: with eps 1e-8 its first steps turn
    # round-off in near-zero gradient entries into +-lr moves, and parameters would not test gradients
    common = [f"teacher.path={tiny_sd}", "train.max_steps=3", "train.checkpoint_every=3", "train.lr=1e-2",
              "train.adam_eps=1.0", "train.grad_clip=1e6",
              "objective.teacher_steps=2" if objective == "regression" else "train.seed=0", *extra]
    # one process, global batch 4
    Trainer(load_config(TINY, [*common, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4"])).run()
    # two processes x batch 2 (the second case also splits into 2 micro-steps of 1)
    split = ["train.batch_size=1", "train.gradient_accumulation=2"] if objective == "two_phase_test" else \
        ["train.batch_size=2"]
    proc = _torchrun([*common, f"train.output_dir={tmp_path / 'two'}", *split])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch" in proc.stdout + proc.stderr
    one, two = _params(tmp_path / "one"), _params(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 10
    start = Trainer(load_config(TINY, [*common, f"train.output_dir={tmp_path / 'fresh'}"]))
    moved = {g: max(float((one[f"param.{g}.{k}"] - p.detach()).abs().max()) for k, p in group.items())
             for g, group in start.groups.items()}
    assert min(moved.values()) > 1e-4, moved  # every group trained, far beyond the tolerance below
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst
    logged = lambda run: [{k: v for k, v in r.items() if k.endswith(("_mse", "_loss", "grad_norm", "_denoising", "_discriminator", "_generator"))} for r in _records(run)]
    for a, b in zip(logged(tmp_path / "one"), logged(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a)
