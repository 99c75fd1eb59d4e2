"""Export: stock diffusers reproduces our students (round trips on the embedded teacher's students),
LoRA files refused when not clean safetensors, folder safety, the recipe, the model card, the CLI."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffdistill import checkpoint as ckpt
from diffdistill import lora
from diffdistill.cli import main
from diffdistill.config import EMBEDDED_TEACHER, StudentConfig, dump_config, load_config
from diffdistill.export import (
    ExportError,
    RecipeWarning,
    export_run,
    export_student,
    load_run_student,
    load_student,
    read_recipe,
)
from diffdistill.lora import LORA_WEIGHT_NAME, LoraFileError
from diffdistill.pipeline import load_teacher
from diffdistill.student import Student, build_student

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "regression.yaml"
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
SEED = 1234
FOUR = [1.0, 0.75, 0.5, 0.25]
LCM4 = [1.0, 0.76, 0.5, 0.26]  # LCMScheduler's 4-step grid with original_inference_steps 50
PCM4 = [1.0, 0.74, 0.5, 0.24]  # the tops of PCM's 4 phases: diffusers 999, 739, 499, 239

# One line per (objective, student kind, timesteps, guidance, objective overrides that keep 2 steps cheap):
# every objective that lands adds its lines here and gets the stock-diffusers round trip.
CASES = [
    ("regression", "full", [1.0], 2.0, ["objective.teacher_steps=2"]),
    ("regression", "full", FOUR, 1.0, ["objective.teacher_steps=2"]),
    ("regression", "lora", [1.0], 1.0, ["objective.teacher_steps=2"]),
    ("regression", "lora", FOUR, 2.0, ["objective.teacher_steps=2"]),
    ("dmd2", "full", FOUR, 1.0, ["data.images=digits", "objective={name: dmd2, student_every: 1}"]),
    ("dmd2", "lora", [1.0], 1.0, ["data.images=digits", "objective={name: dmd2, student_every: 1}"]),
    # DMD2's one-step SDXL recipe: pure noise in, the network told timestep 399 (the call passes timesteps=[399])
    ("dmd2", "full", [0.4], 1.0, ["data.images=digits", "objective={name: dmd2, student_every: 1}"]),
    ("lcm", "lora", LCM4, 1.0, ["data.images=digits", "objective={name: lcm}"]),
    # LCM's guidance embedding: StableDiffusionPipeline embeds guidance_scale instead of running CFG
    ("lcm", "full", LCM4, 3.0, ["data.images=digits", "objective={name: lcm}", "student.guidance_embedding_dim=32"]),
    # TCDScheduler: PCM's deterministic DDIM over its phase tops (no original_inference_steps gives them:
    # the call passes timesteps=), TDD's gamma-sampling (the call passes eta=)
    ("pcm", "lora", PCM4, 1.0, ["data.images=digits", "objective={name: pcm}", "student.gamma=0"]),
    ("tdd", "full", LCM4, 1.5, ["data.images=digits", "objective={name: tdd}", "student.gamma=0.2"]),
]


def _case_id(case):
    objective, kind, ts, g, _ = case
    return f"{objective}-{kind}-{len(ts)}step-g{g:g}"


def _train(run: Path, objective, kind, ts, guidance, overrides) -> Path:
    """Two training steps of ``objective`` on the embedded teacher, so the student is not the teacher."""
    from diffdistill.trainer import Trainer

    lora_args = ["student.lora_rank=4", "student.lora_alpha=2"] if kind == "lora" else []  # scale 0.5: metadata matters
    cfg = load_config(TINY, [f"teacher.path={EMBEDDED_TEACHER}", f"train.output_dir={run}", "train.max_steps=2",
                             "train.lr=1e-2", f"objective.name={objective}", f"student.kind={kind}",
                             f"student.timesteps={ts}", f"student.guidance={guidance}", *lora_args, *overrides])
    Trainer(cfg).run()
    return run


def _ours(teacher, student, prompts=PROMPTS, seed=SEED, output_type="pt") -> torch.Tensor:
    """Our sampler, drawing from one generator in the pipeline's order: initial latents, then re-noising.
    Images in [0, 1] (``pt``) or the final latents (``latent``), as the pipeline's ``output_type``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *teacher.latent_shape), generator=g)
    uncond = teacher.empty_cond(len(prompts)) if student.guidance > 1 else None
    latents = student.generate(noise, teacher.encode_prompt(prompts), uncond, generator=g)
    return latents if output_type == "latent" else (teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)


def _stock(pipe, steps, guidance, prompts=PROMPTS, seed=SEED, output_type="pt", **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def _perturb(student, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.named_parameters_to_train().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def trained(request, tmp_path_factory):
    """A 2-step run per case, exported by ``export_run`` into its ``final/``."""
    objective, kind, ts, guidance, overrides = request.param
    torch.set_num_threads(1)
    run = _train(tmp_path_factory.mktemp("run"), objective, kind, ts, guidance, overrides)
    return request.param, run, export_run(run)


def _call_kwargs(recipe) -> dict:
    """What the model card's call adds: ``timesteps=`` when no scheduler setting yields them, ``eta=`` for TCD's gamma."""
    kwargs = {} if recipe["scheduler"]["default_call_reproduces"] else {"timesteps": recipe["diffusers_timesteps"]}
    if 0 < recipe["gamma"] < 1:
        kwargs["eta"] = recipe["gamma"]
    return kwargs


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stock_diffusers_reproduces_the_student(trained):
    """The model card's call, as ``eval/digits_student.py`` makes it (the base pipeline and ``load_lora_weights``
    for a LoRA), reproduces our sampler."""
    (_, kind, ts, guidance, _), run, out = trained
    teacher, student, info = load_run_student(run)
    assert info["step"] == 2 and info["ema"]
    recipe = read_recipe(out)
    kwargs = _call_kwargs(recipe)
    ours = _ours(teacher, student)
    pipe, call = _script("digits_student").stock_pipeline(out)
    assert call == {"num_inference_steps": len(ts), "guidance_scale": guidance, **kwargs}
    assert type(pipe.scheduler).__name__ == ("LCMScheduler" if student.gamma == 1 else "TCDScheduler")
    theirs = _stock(pipe, len(ts), guidance, **kwargs)
    assert pipe.scheduler.timesteps.tolist() == [round(1000 * t) - 1 for t in ts]
    diff = (theirs - ours).abs().max().item()
    latent_diff = (_stock(pipe, len(ts), guidance, output_type="latent", **kwargs) -
                   _ours(teacher, student, output_type="latent")).abs().max().item()
    teacher_gap = (_ours(teacher, Student(teacher.backbone, None, ts, guidance)) - ours).abs().mean().item()
    print(f"\n{_case_id(trained[0])}: stock vs ours {diff:.2e} (latents {latent_diff:.2e}); "
          f"teacher vs student (mean) {teacher_gap:.3f}")
    assert diff < 1e-4 and latent_diff < 1e-4
    assert teacher_gap > 1e-2  # the round trip is not trivially the teacher's
    if kind == "lora":
        pipe.fuse_lora()
        fused = (_stock(pipe, len(ts), guidance, **kwargs) - ours).abs().max().item()
        print(f"{_case_id(trained[0])}: fused vs ours {fused:.2e}")
        assert fused < 1e-4
    if 0 < student.gamma < 1:  # eta is what makes it exact: the pipeline's default eta=0 is deterministic DDIM
        assert (_stock(pipe, len(ts), guidance, **{**kwargs, "eta": 0.0}) - ours).abs().max().item() > 1e-3


def test_load_student_restores_the_recipe(trained):
    (objective, kind, ts, guidance, _), run, out = trained
    recipe = read_recipe(out)
    assert (recipe["kind"], recipe["timesteps"], recipe["guidance"], recipe["objective"], recipe["step"]) == \
        (kind, ts, guidance, objective, 2)
    assert recipe["diffusers_timesteps"] == [round(1000 * t) - 1 for t in ts]
    assert recipe["scheduler"]["default_call_reproduces"] == (ts not in (PCM4, [0.4]))  # these need timesteps=
    teacher, student, _ = load_run_student(run)
    t2, s2 = load_student(out)
    assert (s2.timesteps, s2.guidance, s2.gamma, s2.adapter is None) == (ts, guidance, student.gamma, kind == "full")
    if 0 < student.gamma < 1:
        assert f"eta={student.gamma:g}" in (out / "README.md").read_text()
    assert (_ours(t2, s2) - _ours(teacher, student)).abs().max().item() < 1e-5
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if kind == "lora":
        assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "diffdistill.json", "scheduler",
                                                                 LORA_WEIGHT_NAME])


# -- cheap tests on the tiny random-init pipeline ----------------------------------------------------------
@pytest.fixture()
def tiny_full(tiny_teacher, one_thread):
    student = build_student(tiny_teacher, StudentConfig(kind="full", timesteps=FOUR, guidance=2.0))
    _perturb(student)
    return tiny_teacher, student


@pytest.fixture()
def tiny_lora(tiny_sd, one_thread):
    teacher = load_teacher(tiny_sd)  # a fresh copy: the adapter must not land on the shared tiny_teacher
    student = build_student(teacher, StudentConfig(kind="lora", lora_rank=4, lora_alpha=8.0, timesteps=[1.0]))
    _perturb(student)
    return teacher, student


def test_non_uniform_timesteps_warn_and_need_explicit_timesteps(tiny_full, tmp_path):
    from diffusers import DiffusionPipeline

    teacher, student = tiny_full
    student.timesteps = [1.0, 0.8, 0.3]
    with pytest.warns(RecipeWarning, match=r"timesteps=\[999, 799, 299\]"):
        out = export_student(teacher, student, tmp_path / "out")
    assert not read_recipe(out)["scheduler"]["default_call_reproduces"]
    assert "timesteps=[999, 799, 299]" in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(out))
    theirs = _stock(pipe, None, 2.0, timesteps=[999, 799, 299])
    assert (theirs - _ours(teacher, student)).abs().max().item() < 1e-4


@pytest.mark.parametrize("ts, match", [([0.7505], "fractional"), ([1.0, 0.001], "timestep 0")])
def test_unreproducible_timesteps_are_refused(tiny_full, tmp_path, ts, match):
    teacher, student = tiny_full
    student.timesteps = ts
    with pytest.raises(ExportError, match=match):
        export_student(teacher, student, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_safety(tiny_full, tmp_path):
    teacher, student = tiny_full
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not create"):
        export_student(teacher, student, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    export_student(teacher, student, foreign, overwrite=True)  # replaced whole
    assert not (foreign / "notes.txt").exists() and (foreign / "unet").is_dir()
    export_student(teacher, student, foreign)  # an earlier export of ours: replaced without overwrite
    (foreign / "notes.txt").write_text("added by hand")
    with pytest.raises(FileExistsError):
        export_student(teacher, student, foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_student(teacher, student, empty)
    with pytest.raises(ExportError, match="reads"):
        export_student(teacher, student, Path(teacher.source).parent, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]  # no temporary folders left
    assert oct((empty / "unet").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_crash_leaves_nothing_half_written(tiny_full, tmp_path, monkeypatch):
    teacher, student = tiny_full
    out = export_student(teacher, student, tmp_path / "out")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("diffdistill.model_card.model_card", crash)
    for target in (tmp_path / "out", tmp_path / "new"):
        with pytest.raises(RuntimeError, match="disk full"):
            export_student(teacher, student, target)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lora_round_trip_and_refused_files(tiny_lora, tmp_path):
    teacher, student = tiny_lora
    out = export_student(teacher, student, tmp_path / "lora")
    t2, s2 = load_student(out)
    assert t2.backbone.denoiser.peft_config["student"].lora_alpha == 8.0
    assert (_ours(t2, s2) - _ours(teacher, student)).abs().max().item() < 1e-6
    weights = out / LORA_WEIGHT_NAME
    # the PeftModel naming diffusers' LCM-LoRA example scripts save (unet.base_model.model.<module>...)
    from safetensors.torch import load_file

    wrapped = tmp_path / "wrapped.safetensors"
    save_file({k.replace("unet.", "unet.base_model.model.", 1): v for k, v in load_file(str(weights)).items()},
              str(wrapped))
    lora.load_lora(t2.backbone.denoiser, "wrapped", wrapped)
    params = dict(t2.backbone.denoiser.named_parameters())
    pairs = [(k, k.replace(".student.", ".wrapped.")) for k in params if ".student." in k]
    assert pairs and all(torch.equal(params[a], params[b]) for a, b in pairs)
    assert t2.backbone.denoiser.peft_config["wrapped"].r == 4  # no metadata: rank from the weights

    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(LoraFileError, match=r"pytorch_lora_weights\.bin.*must be a \.safetensors"):
        lora.load_lora(t2.backbone.denoiser, "other", pickled)
    foreign = tmp_path / "foreign.safetensors"  # a LoRA for layers this model does not have
    save_file({"unet.no_such_block.lora_A.weight": torch.zeros(2, 4), "unet.no_such_block.lora_B.weight":
               torch.zeros(4, 2)}, str(foreign))
    with pytest.raises(LoraFileError, match=r"foreign\.safetensors does not fit this model.*no_such_block"):
        lora.load_lora(t2.backbone.denoiser, "foreign", foreign)
    no_lora = tmp_path / "plain.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2)}, str(no_lora))
    with pytest.raises(LoraFileError, match="holds no LoRA weights"):
        lora.load_lora(t2.backbone.denoiser, "other", no_lora)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(LoraFileError, match=re.escape(str(weights)) + ".*corrupt"):
        load_student(out)
    weights.write_bytes(pickled.read_bytes())  # a pickle under a .safetensors name
    with pytest.raises(LoraFileError, match="corrupt"):
        load_student(out)


def _fake_run(run: Path, tiny_sd, kind="full") -> tuple[dict, dict]:
    """A run folder with one complete checkpoint whose EMA and live student weights differ (no Trainer)."""
    cfg = load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}", f"student.kind={kind}"])
    student = build_student(load_teacher(tiny_sd), cfg.student)
    params = student.named_parameters_to_train()
    live = {k: p.detach() + 0.01 for k, p in params.items()}
    ema = {k: p.detach() - 0.01 for k, p in params.items()}
    tensors = {**ckpt.prefixed("param.student", live), **ckpt.prefixed("ema", ema)}
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    ckpt.write_checkpoint(run, 4, tensors, {"step": 4}, dump_config(cfg), keep=2)
    return live, ema


def test_load_run_student_picks_ema_or_live_weights(tiny_sd, tmp_path, one_thread):
    live, ema = _fake_run(tmp_path / "run", tiny_sd, kind="lora")
    for use_ema, expected in ((True, ema), (False, live)):
        _, student, info = load_run_student(tmp_path / "run", checkpoint="step-000004", ema=use_ema)
        got = student.named_parameters_to_train()
        assert info["step"] == 4 and info["objective"] == "regression"
        assert all(torch.equal(got[k], v) for k, v in expected.items())
    for name in (4, "4", str(tmp_path / "run" / "checkpoints" / "step-000004")):  # int, the CLI's string, a path
        assert load_run_student(tmp_path / "run", checkpoint=name)[2]["step"] == 4
    with pytest.raises(ExportError, match="not a complete checkpoint"):
        load_run_student(tmp_path / "run", checkpoint=7)


def test_cli_export_and_the_model_card_snippet_runs(tiny_sd, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    _fake_run(run, tiny_sd)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "full student" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    for needle in (tiny_sd, "Luhman & Luhman", "num_inference_steps=2", "guidance_scale=1.0", "Training step | 4",
                   "`objective.teacher_steps` | 2"):
        assert needle in card
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    scope = {}
    exec(code, scope)  # noqa: S102 -- the card's own snippet, as a user would paste it
    assert scope["image"].size == (16, 16)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "foreign")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "foreign"), "--overwrite"]) == 0
    assert main(["export", str(run)]) == 0 and (run / "final" / "model_index.json").is_file()
    assert main(["export", str(run), "--out", str(run), "--overwrite"]) == 2  # never replaces the run itself


def test_model_card_eval_table(tiny_full, tmp_path):
    teacher, student = tiny_full
    table = {"student (4 steps)": {"fid": 6.123456, "prompt_accuracy": 0.97, "ms_per_image": None}}
    out = export_student(teacher, student, tmp_path / "out", eval_table=table, step=10)
    card = (out / "README.md").read_text()
    assert "| | fid | prompt_accuracy | ms_per_image |" in card
    assert "| student (4 steps) | 6.123 | 0.97 | n/a |" in card
    assert json.loads((out / "diffdistill.json").read_text())["step"] == 10


def test_student_init_starts_a_run_from_an_export(tiny_full, tiny_sd, tmp_path):
    """``student.init``: a full or LoRA student starts from an exported one's weights (the run's own timesteps
    kept), the trainer's EMA starts there too, and exports of another kind, rank or alpha are refused."""
    from diffdistill.config import ConfigError
    from diffdistill.trainer import Trainer

    teacher, donor = tiny_full
    full = export_student(teacher, donor, tmp_path / "full")
    student = build_student(teacher, StudentConfig(kind="full", timesteps=[0.4, 0.2], init=str(full)))
    assert student.timesteps == [0.4, 0.2]
    got, want = student.named_parameters_to_train(), donor.named_parameters_to_train()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    base = dict(teacher.backbone.denoiser.named_parameters())
    assert any(not torch.equal(want[k], base[k]) for k in want)  # the donor differs from the teacher
    assert all(p.requires_grad for p in got.values())
    trainer = Trainer(load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={tmp_path / 'run'}",
                                         f"student.init={full}"]))
    shadow = trainer.ema.state_dict()
    live = trainer.student.named_parameters_to_train()
    assert all(torch.equal(shadow[k], want[k].float()) and torch.equal(live[k], want[k]) for k in want)

    lora_teacher = load_teacher(tiny_sd)
    lora_donor = build_student(lora_teacher, StudentConfig(kind="lora", lora_rank=4, lora_alpha=8.0))
    _perturb(lora_donor)
    adapter = export_student(lora_teacher, lora_donor, tmp_path / "lora")
    fresh = load_teacher(tiny_sd)
    student = build_student(fresh, StudentConfig(kind="lora", lora_rank=4, lora_alpha=8.0, init=str(adapter)))
    got, want = student.named_parameters_to_train(), lora_donor.named_parameters_to_train()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.requires_grad for p in got.values())
    assert not any(p.requires_grad for k, p in fresh.backbone.denoiser.named_parameters() if ".student." not in k)

    for cfg, match in [(StudentConfig(kind="lora", lora_rank=2, lora_alpha=8.0, init=str(adapter)), r"rank \[4\]"),
                       (StudentConfig(kind="lora", lora_rank=4, init=str(adapter)), r"alpha 8\.0.*alpha 4"),
                       (StudentConfig(kind="full", init=str(adapter)), "holds a lora student; this run trains a full"),
                       (StudentConfig(kind="lora", lora_rank=4, lora_alpha=8.0, init=str(full)), "holds a full student"),
                       (StudentConfig(kind="full", init=tiny_sd), "not a diffdistill export"),
                       (StudentConfig(kind="full", guidance_embedding_dim=8, init=str(full)),  # its cond_proj: not in it
                        r"does not fit this student: 1 weights missing.*cond_proj")]:
        with pytest.raises(ConfigError, match="student.init.*" + match):
            build_student(load_teacher(tiny_sd), cfg)
    with pytest.raises(ConfigError, match="student.init.*folder of an exported student"):
        StudentConfig(init=str(tmp_path / "missing")).validate("student")


def test_renoise_change_script_compares_a_later_step_with_the_teacher(tiny_teacher, tiny_sd, tmp_path, capsys,
                                                                       one_thread):
    """eval/renoise_change.py: an untrained full student is the teacher's network, so without guidance both
    estimates agree exactly; a perturbed one differs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("renoise_change", ROOT / "eval" / "renoise_change.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    numbers = lambda text: [float(x) for x in re.findall(r"(?<=[ (])(\d+\.\d{3})\b", text)]
    student = build_student(tiny_teacher, StudentConfig(kind="full", timesteps=FOUR))
    same = export_student(tiny_teacher, student, tmp_path / "same")
    script.main([str(same), "--base", tiny_sd, "--guidance", "1", "--per-digit", "2"])
    x0, ours, theirs, gap = numbers(capsys.readouterr().out)
    assert x0 > 0 and ours == theirs > 0 and gap == 0.0
    _perturb(student, scale=0.05)
    moved = export_student(tiny_teacher, student, tmp_path / "moved")
    script.main([str(moved), "--base", tiny_sd, "--guidance", "1", "--per-digit", "2", "--t", "0.5"])
    out = capsys.readouterr().out
    assert out.startswith("t = 0.5 ") and numbers(out)[3] > 0
