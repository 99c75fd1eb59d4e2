"""Demo-quality runs (``slow``; ``make test-all``): one shipped digits config per objective family, trained to the
end on the embedded teacher and evaluated beside it with the ``digits`` protocol.

Minutes each on our 2-core machine (the configs' training times are in docs/methods and the README). The bars are
relative to the teacher's own 25-step FID measured in the same test, with room for the spread over training seeds
(about 2 FID at 1000 images) and for the higher FID of a 300-image evaluation; each lies far below what a student
that learns in the wrong direction, or not at all, scores (the teacher's one-step DDIM sample: FID about 100x the
teacher's). The figures each config reached when it was tuned are docs' business, not these tests'.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one objective per family -> (demo config, student FID bar as a multiple of the teacher's 25-step FID, prompt-accuracy
# bar): regression, distribution matching, consistency, variational score distillation, adversarial
FAMILIES = {
    "regression": ("regression_digits.yaml", 6.0, 0.85),
    "dmd2": ("dmd2_digits.yaml", 2.0, 0.9),
    "lcm": ("lcm_digits.yaml", 2.5, 0.9),
    "swiftbrush": ("swiftbrush_digits.yaml", 20.0, 0.9),
    "ladd": ("ladd_digits.yaml", 10.0, 0.85),
}
NUM_IMAGES = 300


@pytest.fixture(scope="module")
def teacher_fid():
    from diffdistill.config import EMBEDDED_TEACHER
    from diffdistill.eval.harness import Model, evaluate

    result, _ = evaluate(Model("teacher, 25 DDIM steps", "teacher", EMBEDDED_TEACHER, steps=25, guidance=2.0),
                         "digits", num_images=NUM_IMAGES)
    return result["fid"]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_shipped_digits_config_distills_the_teacher(family, teacher_fid, tmp_path):
    from diffdistill.config import EMBEDDED_TEACHER, load_config
    from diffdistill.eval.harness import Model, evaluate
    from diffdistill.trainer import train

    name, fid_bar, accuracy_bar = FAMILIES[family]
    config = load_config(ROOT / "configs" / "demo" / name, [f"teacher.path={EMBEDDED_TEACHER}",
                                                             f"train.output_dir={tmp_path / 'run'}"])
    final = train(config) / "final"
    result, _ = evaluate(Model(family, "export", str(final)), "digits", num_images=NUM_IMAGES)
    assert result["fid"] <= fid_bar * teacher_fid, (family, result["fid"], teacher_fid)
    assert result["prompt_accuracy"] >= accuracy_bar, (family, result["prompt_accuracy"])
