"""`diffdistill eval` / `sample` on teachers, exported students and run folders; input errors surface
before any model loads."""

import json

import pytest

from diffdistill.cli import main
from diffdistill.config import EMBEDDED_TEACHER

KEYS = {"fid", "clip_score", "prompt_accuracy", "diversity", "nfe", "ms_per_image"}


@pytest.fixture()
def no_model_loads(monkeypatch):
    import diffdistill.pipeline

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(diffdistill.pipeline, "load_teacher", refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two checkpoints of a tiny regression run on the embedded teacher, exported to final/."""
    from diffdistill.config import load_config
    from diffdistill.trainer import Trainer

    out = tmp_path_factory.mktemp("run") / "r"
    cfg = load_config(None, ["objective={name: regression, teacher_steps: 2}", f"teacher.path={EMBEDDED_TEACHER}",
                             f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
                             "train.checkpoint_every=1", "train.sample_every=2", "train.lr=1e-3",
                             "eval.every=2", "eval.num_images=20"])
    Trainer(cfg).run()
    return out


def test_input_errors_before_any_model_loads(tmp_path, capsys, no_model_loads):
    def fails(*args, match):
        assert main(["eval", *args]) == 2
        assert match in capsys.readouterr().err

    fails(EMBEDDED_TEACHER, "--protocol", "digit", match="did you mean 'digits'")
    (tmp_path / "empty").mkdir()
    fails(str(tmp_path / "empty"), match="not a diffusers pipeline folder")
    fails(str(tmp_path / "missing"), match="does not exist")
    fails(EMBEDDED_TEACHER, "--protocol", "coco2017-5k", match="--captions")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    fails(EMBEDDED_TEACHER, "--protocol", "coco2017-5k", "--captions", str(captions), "--images", str(tmp_path),
          "--num-images", "1", match="caption")
    captions.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                    "annotations": [{"id": 5, "image_id": 1, "caption": "a cat"}]}))
    fails(EMBEDDED_TEACHER, "--protocol", "coco2017-5k", "--captions", str(captions), "--images",
          str(tmp_path / "nope"), "--num-images", "1", match="does not exist")
    fails(EMBEDDED_TEACHER, "--num-images", "15", match="multiple of 10")
    fails(EMBEDDED_TEACHER, "--all-checkpoints", match="need a run folder")


def test_eval_a_teacher_writes_metrics_report_and_grid(tmp_path, one_thread):
    out = tmp_path / "e"
    assert main(["eval", EMBEDDED_TEACHER, "--num-images", "20", "--steps", "4", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert KEYS <= m.keys() and m["protocol"] == "digits" and m["num_images"] == 20
    assert m["nfe"] == 8 and m["guidance"] == 2.0 and m["steps"] == 4  # digits teacher default: guidance 2
    assert 0 <= m["prompt_accuracy"] <= 1 and m["fid"] > 0 and m["ms_per_image"] > 0
    report = (out / "report.md").read_text()
    assert "| model | steps | NFE | FID |" in report and "| digits-sd | 4 | 8 |" in report
    assert (out / "grid.png").stat().st_size > 0


def test_eval_run_folder_final_and_all_checkpoints(run, tmp_path, one_thread):
    out = tmp_path / "all"
    assert main(["eval", str(run), "--all-checkpoints", "--num-images", "20", "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["r step-000001", "r step-000002"]
    assert all(KEYS <= r.keys() and r["nfe"] == 1 and r["steps"] == 1 for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # different weights, different samples
    out2 = tmp_path / "final"
    assert main(["eval", str(run), "--num-images", "20", "--out", str(out2)]) == 0
    final = json.loads((out2 / "metrics.json").read_text())
    assert final["model"] == "r final" and abs(final["fid"] - rows[1]["fid"]) < 1e-3  # final/ = last EMA
    assert main(["eval", str(run / "final"), "--steps", "3"]) == 2  # an export's recipe is fixed
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    [in_training] = [r for r in logged if r["phase"] == "eval"]  # eval.every=2 of 2 steps
    assert in_training["step"] == 2 and abs(in_training["fid"] - rows[1]["fid"]) < 1e-3  # same EMA, same seed


def test_eval_a_multistep_student_after_its_first_steps(tmp_path, capsys, one_thread):
    """--student-steps N samples with the first N trained timesteps; the last of them lands on the clean
    image, so after 1 step the sample is the student's clean prediction from the noise at its first time."""
    import torch

    from diffdistill.config import load_config
    from diffdistill.eval.harness import resolve_models, sampler
    from diffdistill.trainer import Trainer

    out = tmp_path / "two"
    cfg = load_config(None, ["objective={name: regression, teacher_steps: 2, num_pairs: 4}",
                             f"teacher.path={EMBEDDED_TEACHER}", "student.timesteps=[1.0, 0.5]",
                             f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=2",
                             "train.checkpoint_every=1", "train.sample_every=1", "train.lr=1e-3"])
    Trainer(cfg).run()
    for spec in (str(out / "final"), str(out)):
        [m] = resolve_models(spec, student_steps=1)
        teacher, student = m.load()
        assert student.timesteps == [1.0] and m.label.endswith("first 1 of 2 steps")
    prompts = ["a handwritten digit 3", "a handwritten digit 8"]
    images = sampler(m)(prompts, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((2, *teacher.latent_shape), generator=g)
    with torch.no_grad():
        x0 = student(noise, 1.0, teacher.encode_prompt(prompts), out="x0")
        expected = (teacher.decode_latents(x0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    [full] = resolve_models(str(out / "final"))
    assert not torch.allclose(sampler(full)(prompts, torch.Generator().manual_seed(7)), images, atol=1e-3)

    report = tmp_path / "e"
    assert main(["eval", str(out / "final"), "--student-steps", "1", "--num-images", "20", "--out", str(report)]) == 0
    m = json.loads((report / "metrics.json").read_text())
    assert m["steps"] == 1 and m["nfe"] == 1 and m["student_timesteps"] == [1.0]
    assert m["model"] == "final, first 1 of 2 steps"
    for args, match in ((["--student-steps", "3"], "from 1 to the student's 2"), (["--student-steps", "0"], "at least 1")):
        assert main(["eval", str(out / "final"), *args]) == 2
        assert match in capsys.readouterr().err
    assert main(["eval", EMBEDDED_TEACHER, "--student-steps", "1"]) == 2
    assert "students only" in capsys.readouterr().err


def test_eval_config_is_checked():
    from diffdistill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.protocol.*did you mean 'digits'"):
        load_config(None, ["objective.name=regression", "eval.protocol=digit"])
    with pytest.raises(ConfigError, match="eval.captions"):
        load_config(None, ["objective.name=regression", "eval.protocol=coco2017-5k", "eval.every=100"])


def test_sample_an_exported_student(run, tmp_path):
    from PIL import Image

    out = tmp_path / "s.png"
    assert main(["sample", str(run / "final"), "a handwritten digit 4", "--num-images", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[1] == 32 + 2 * 2


def test_sample_a_student_with_a_negative_prompt(run, tmp_path):
    """NASA steers the one-step student (different pixels at the same seed); bad weights are refused."""
    import numpy as np
    from PIL import Image

    args = ["sample", str(run / "final"), "a handwritten digit 4", "--num-images", "2"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png"), "--negative-prompt", "a handwritten digit 9",
                 "--nasa-scale", "0.5"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float64) for n in "ab")
    assert np.abs(a - b).max() >= 2  # a barely trained student on black backgrounds: few pixels move, but some do
    assert main([*args, "--out", str(tmp_path / "c.png"), "--negative-prompt", "x", "--nasa-scale", "-1"]) == 2


def test_nasa_digits_script(run, tmp_path):
    """eval/nasa_digits.py: confusion = the closest other class; paired rows per weight; json + grid."""
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "eval" / "nasa_digits.py"
    spec = importlib.util.spec_from_file_location("nasa_digits", path)
    nasa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nasa)
    sims = torch.tensor([[0.9, 0.5, 0.7], [0.8, 0.9, 0.1], [0.1, 0.6, 0.9], [0.9, 0.2, 0.8]])
    assert nasa.confusions(sims, torch.tensor([0, 1, 2, 0])) == [2, 0, 1]
    out = tmp_path / "nasa"
    assert nasa.main([str(run / "final"), "--scales", "0.5", "--n-per-digit", "2", "--out", str(out)]) == 0
    result = json.loads((out / "nasa.json").read_text())
    assert [r["scale"] for r in result["rows"]] == [0.0, 0.5] and (out / "grid.png").is_file()
    assert all(c != d for d, c in enumerate(result["confusion"]))
    assert result["negative_prompts"]["3"] == f"a handwritten digit {result['confusion'][3]}"
    assert 0.0 <= result["rows"][1]["concept_lower_share"] <= 1.0
    assert nasa.main([str(run / "final"), "--scales", "0"]) == 2
    assert torch.is_grad_enabled()  # the script leaves autograd as it found it


def test_demo_end_to_end_small(tmp_path, capsys, one_thread):
    from diffdistill.demo import run_demo

    rows = run_demo(tmp_path / "demo", n_per_digit=2, overrides=[
        "objective.num_pairs=8", "objective.teacher_steps=2", "train.max_steps=2", "train.batch_size=4",
        "train.checkpoint_every=2", "train.sample_every=2"])
    assert [r["model"] for r in rows] == ["teacher, 25 DDIM steps", "teacher, 1 DDIM step",
                                          "student (regression), 1 step"]
    assert [r["nfe"] for r in rows] == [50, 2, 1]
    out = capsys.readouterr().out
    assert "| teacher, 25 DDIM steps | 25 | 50 |" in out and "speed-up" in out
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "grid.png").is_file()
    assert (tmp_path / "demo" / "regression" / "final" / "model_index.json").is_file()


def test_evaluate_takes_a_sample_function(one_thread):
    import torch

    from diffdistill import evaluate

    def sample(prompts, generator):
        return torch.rand((len(prompts), 3, 32, 32), generator=generator)

    result, images = evaluate(sample, "digits", num_images=20)
    assert images.shape == (20, 3, 32, 32) and result["num_images"] == 20
    assert result["nfe"] is None and result["fid"] > result["fid_real_floor"]  # noise is far from digits
    assert result["prompt_accuracy"] <= 0.5
