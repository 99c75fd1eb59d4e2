"""The README's recipe table: ``diffdistill plan`` of every shipped real-teacher config (configs/<method>/*.yaml
but demo/ and tiny/), at real architecture on the meta device, offline.

    python eval/plan_recipes.py [--gpu-memory 80]

One markdown row per config: the teacher, the student and fake-score kinds, parameters of every network the run
holds, the trained ones, and the static memory of one process (weights, fp32 gradients, AdamW moments, EMA);
activations are not counted (not measured)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffdistill.config import load_config
from diffdistill.plan import GB, plan

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB of one GPU, for the last column")
    args = parser.parse_args()
    configs = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name not in ("demo", "tiny"))
    print("| config | teacher (dtype) | student | fake score | params | trained | static GB / process | "
          f"static fits {args.gpu_memory:g} GB |")
    print("|---|---|---|---|---|---|---|---|")
    for path in configs:
        config = load_config(path)
        p = plan(config, alternatives=False)
        rows = {r.name: r for r in p.rows}
        fake = getattr(config.objective, "fake_score", None) if "fake_score" in {
            g for r in p.rows for g in r.groups} else None
        teacher = config.teacher.path.split("/")[-1]
        params = sum(r.params for r in p.rows)
        trained = sum(r.trainable for r in p.rows)
        static = p.static_bytes / GB
        heads = " + heads" if any("disc" in r.groups for r in rows.values()) else ""
        print(f"| [`{path.relative_to(ROOT / 'configs')}`](configs/{path.relative_to(ROOT / 'configs')}) | {teacher} "
              f"({config.teacher.dtype}) | {config.student.kind}{heads} | {fake or '-'} | {params / 1e9:.2f} B | "
              f"{trained / 1e9:.3f} B | {static:.1f} | {'yes' if static < args.gpu_memory else 'no'} |")


if __name__ == "__main__":
    main()
