"""GPU: the training loop under bf16 autocast on CUDA (fp32 master weights), on the embedded teacher.
Run with `pytest -m gpu` on a CUDA machine."""

import json

import pytest
import torch

from diffdistill.config import load_config
from diffdistill.trainer import Trainer


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_regression_on_cuda(tmp_path, precision):
    assert torch.cuda.is_available(), "this test needs CUDA"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
    cfg = load_config("configs/demo/regression_digits.yaml", [
        f"train.output_dir={tmp_path / precision}", "train.max_steps=60", "train.batch_size=64",
        f"train.mixed_precision={precision}", "train.sample_every=30", "train.checkpoint_every=30",
        "objective.num_pairs=0", "objective.teacher_steps=10", "train.lr=3e-4"])
    trainer = Trainer(cfg)
    assert trainer.acc.device.type == "cuda" and trainer.acc.mixed_precision == precision
    trainer.run()
    records = [json.loads(x) for x in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
    losses = [r["regression_mse"] for r in records]
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainer.groups["student"].values())
    assert (tmp_path / precision / "samples" / "step-000060.png").is_file()
    skipped = [r for r in records if r.get("skipped")]
    if precision == "bf16":
        assert not skipped
    else:  # fp16: the gradient scaler calibrates its scale on overflowing first steps, then trains
        assert all(r["step"] < 15 and "fp16 overflow" in r["nonfinite"] for r in skipped)
