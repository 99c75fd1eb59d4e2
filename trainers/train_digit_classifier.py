"""Train the second digits evaluator (assets/evaluators/digits-cnn): a small CNN digit classifier, from scratch,
on the HELD-IN real digits only, with labels (no captions, no teacher, no generated images).

Cross-entropy, AdamW with a one-cycle schedule, random shifts of up to 2 pixels. Seeded and deterministic on
CPU (about two minutes on two cores). Writes the weights (safetensors), its config, and a training report with
the held-out accuracy overall, per digit and the confusion matrix (rows: true digit, columns: predicted).

    python trainers/train_digit_classifier.py --out assets/evaluators/digits-cnn
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffdistill.data import load_split, random_shift
from diffdistill.eval.digit_classifier import MODEL_CONFIG, DigitClassifier, build_model


def confusion(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(10, 10)`` counts: row = true digit, column = predicted."""
    return torch.bincount(labels * 10 + pred, minlength=100).reshape(10, 10)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/evaluators/digits-cnn")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train = load_split("held_in")
    model = build_model(MODEL_CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    start = time.time()
    for step in (bar := tqdm(range(args.steps), desc="digit classifier")):
        idx = torch.randint(len(train.images), (args.batch_size,), generator=g)
        x = DigitClassifier.prepare(random_shift(train.images[idx], g))
        loss = F.cross_entropy(model(x), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    clf = DigitClassifier(model)
    held_out = load_split("held_out")
    pred = clf.classify(held_out.images)
    matrix = confusion(pred, held_out.labels)
    per_digit = (matrix.diag().double() / matrix.sum(1).double()).tolist()
    report = {"accuracy_held_out": (pred == held_out.labels).double().mean().item(),
              "accuracy_held_in": (clf.classify(train.images) == train.labels).double().mean().item(),
              "accuracy_held_out_per_digit": [round(a, 4) for a in per_digit],
              "confusion_held_out": matrix.tolist(), "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "seed": args.seed, "train_seconds": round(time.time() - start, 1),
              "note": "trained on the held-in split only; confusion rows: true digit, columns: predicted"}
    clf.save(args.out, metadata={"trained_on": "held_in", "seed": args.seed, "steps": args.steps,
                                 "accuracy_held_out": report["accuracy_held_out"]})
    Path(args.out, "training_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "confusion_held_out"}, indent=1))
    return report


if __name__ == "__main__":
    main()
