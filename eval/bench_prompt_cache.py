"""Prompt encoding with and without ``Teacher.encode_prompt``'s per-prompt cache, side by side.

A digits training run draws 32 captions a step from the 100 training captions (10 wordings x 10 digits); before the cache every call ran
the frozen text encoder on all of them (``Family.encode``, what ``encode_prompt`` did), now each distinct
prompt is encoded once. Prints milliseconds per batch of both and their ratio::

    python eval/bench_prompt_cache.py --batches 200
"""

from __future__ import annotations

import argparse
import time

import torch

from diffdistill.config import EMBEDDED_TEACHER
from diffdistill.data import TRAIN_TEMPLATES, caption
from diffdistill.pipeline import load_teacher


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=EMBEDDED_TEACHER)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    teacher = load_teacher(args.teacher)
    pool = [caption(d, template) for d in range(10) for template in TRAIN_TEMPLATES]
    g = torch.Generator().manual_seed(0)
    batches = [[pool[i] for i in torch.randint(len(pool), (args.batch_size,), generator=g).tolist()]
               for _ in range(args.batches)]

    def ms_per_batch(encode) -> float:
        start = time.perf_counter()
        for prompts in batches:
            encode(prompts)
        return (time.perf_counter() - start) / len(batches) * 1000

    uncached = ms_per_batch(lambda prompts: teacher.family.encode(teacher, prompts).to(dtype=teacher.dtype))
    cached = ms_per_batch(teacher.encode_prompt)
    print(f"{args.batches} batches of {args.batch_size} digit prompts: text encoder every call {uncached:.1f} ms, "
          f"cached {cached:.2f} ms per batch; ratio {uncached / cached:.1f}x")


if __name__ == "__main__":
    main()
