"""eval/bench_lcm_reference.py without diffusers' script: argument handling, the settings both sides get,
the webdataset shards (read back by our own reader, not webdataset), loop timing from tensorboard
events, and the script's LoRA output format loaded into our sampler (checked against stock diffusers)."""

from __future__ import annotations

import importlib.util
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
LCM_GRID_4_OF_50 = [1.0, 0.76, 0.5, 0.26]  # diffusers timesteps 999, 759, 499, 259


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lcm_reference", REPO / "eval" / "bench_lcm_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _settings(bench, **kw):
    base = {"steps": 20, "batch_size": 8, "lora_rank": 16, "lora_alpha": 16, "lr": 5e-4, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0,
            "seed": 3, "num_ddim_timesteps": 50, "w_min": 1.5, "w_max": 3.0, "huber_c": 0.001,
            "timestep_scaling": 10.0, "timesteps": LCM_GRID_4_OF_50}
    return bench.Settings(**{**base, **kw})


def test_arguments(bench):
    args = bench.parse_args(["--diffusers-script", "s.py", "--steps", "7", "train.lr=1e-3"])
    assert (args.steps, args.batch_size, args.timesteps, args.sample_steps) == (7, None, None, 4)
    assert args.diffusers_autocast == "off" and args.ours_data == "shards" and args.overrides == ["train.lr=1e-3"]
    args = bench.parse_args(["--diffusers-script", "s.py", "--timesteps", "1.0,0.5", "--sample-steps", "2"])
    assert args.timesteps == [1.0, 0.5]
    for bad in (["--steps", "2"], ["--num-images", "25"], ["--timesteps", "1.0,0.5"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--diffusers-script", "s.py", *bad])
    with pytest.raises(SystemExit):
        bench.parse_args([])  # --diffusers-script is required


def test_missing_packages_are_named(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "REQUIRED_PACKAGES", ("webdataset", "no_such_module_for_the_bench"))
    assert "no_such_module_for_the_bench" in bench.missing_packages()
    assert bench.main(["--diffusers-script", "s.py"]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "no_such_module_for_the_bench" in err


def test_diffusers_arguments_match_the_settings(bench):
    st = _settings(bench)
    cli = bench.diffusers_cli(st, "teacher", "out", "shards/{000000..000003}.tar")
    opts = dict(zip(cli[::2], cli[1::2]))
    assert len(opts) * 2 == len(cli)  # flags with one value each, nothing positional
    assert float(opts["--w_min"]) == 0.5 and float(opts["--w_max"]) == 2.0  # LCM's w = diffusers scale - 1
    assert (opts["--lora_rank"], opts["--lora_alpha"], opts["--train_batch_size"]) == ("16", "16", "8")
    assert opts["--loss_type"] == "huber" and float(opts["--huber_c"]) == 0.001
    assert opts["--mixed_precision"] == "no" and opts["--num_ddim_timesteps"] == "50"
    assert float(opts["--learning_rate"]) == 5e-4 and float(opts["--adam_weight_decay"]) == 0.0
    assert opts["--max_train_samples"] == str(20 * 8) and opts["--dataloader_num_workers"] == "1"
    assert int(opts["--checkpointing_steps"]) > 20 and int(opts["--validation_steps"]) > 20
    assert opts["--seed"] == "3" and opts["--resolution"] == "32"
    with pytest.raises(SystemExit):
        bench.diffusers_cli(_settings(bench, lora_alpha=2.5), "t", "o", "s")


def test_our_config_resolves_to_shared_settings(bench):
    args = bench.parse_args(["--diffusers-script", "s.py", "--steps", "12", "--batch-size", "4", "--lora-rank", "8"])
    config, overrides, st = bench.resolve(args)
    assert (st.steps, st.batch_size, st.lora_rank, st.lora_alpha) == (12, 4, 8, 8)
    assert config.student.kind == "lora" and config.objective.loss == "huber"
    assert st.timesteps == pytest.approx(LCM_GRID_4_OF_50)  # stock LCMScheduler's 4-step grid
    cmd = bench.ours_cli(args.config, overrides, st, "RUN", "shards/{000000..000003}.tar")
    assert cmd[:3] == ["-m", "diffdistill.cli", "train"] and "train.max_steps=12" in cmd
    assert "data.images=shards/{000000..000003}.tar" in cmd and "train.output_dir=RUN" in cmd
    from diffdistill.config import load_config

    load_config(args.config, cmd[5:])  # every override we pass is a valid key
    with pytest.raises(SystemExit, match="empty_prompt_prob"):
        bench.settings_from_config(load_config(args.config, overrides + ["objective.empty_prompt_prob=0.1"]))


def test_check_script(bench, tmp_path):
    flags = ("--pretrained_teacher_model --train_shards_path_or_url --lora_rank --w_min --num_ddim_timesteps "
             "--huber_c --max_train_samples")
    script = tmp_path / "train.py"
    script.write_text(f'# {flags}\ncheck_min_version("0.40.0.dev0")\n')
    info = bench.check_script(script, installed="0.42.1")
    assert info.min_version == "0.40.0.dev0" and not info.bypass_version_check
    script.write_text(f'# {flags}\ncheck_min_version("0.99.0.dev0")\n')
    assert bench.check_script(script, installed="0.42.1").bypass_version_check
    script.write_text(f"# {flags}\npipeline = [wds.select(WebdatasetFilter(min_size=1024))]\n")
    with pytest.raises(SystemExit, match="WebdatasetFilter"):
        bench.check_script(script, installed="0.42.1")
    script.write_text("# some other training script\n")
    with pytest.raises(SystemExit, match="--pretrained_teacher_model"):
        bench.check_script(script, installed="0.42.1")
    with pytest.raises(SystemExit, match="does not exist"):
        bench.check_script(tmp_path / "absent.py")


def test_shards_round_trip_through_our_reader(bench, tmp_path):
    from diffdistill.sources import WebDatasetShards

    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 3, 32, 32, generator=g) * 2 - 1
    captions = [f"a handwritten digit {i}" for i in range(7)]
    pattern = bench.write_shards(tmp_path, images, captions, per_shard=3, seed=1)
    assert pattern == str(tmp_path / "{000000..000002}.tar")
    with tarfile.open(tmp_path / "000000.tar") as tar:
        names = tar.getnames()
    keys = sorted({n.split(".")[0] for n in names})
    assert len(keys) == 3 and sorted(names) == sorted(f"{k}.{e}" for k in keys for e in ("png", "txt", "json"))
    source = WebDatasetShards(pattern, 32)
    assert len(source) == 7
    by_caption = dict(source[i][::-1] for i in range(len(source)))
    for i, cap in enumerate(captions):
        assert torch.allclose(by_caption[cap], images[i], atol=1 / 127.5 + 1e-6)  # 8-bit PNG, lossless
    with pytest.raises(ValueError):
        bench.write_shards(tmp_path / "bad", images, captions[:3])


def test_loop_rate_from_tensorboard_events(bench, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(1, 6):  # the first step is not timed: 4 steps in 2 s
        for tag in ("loss", "lr"):
            writer.add_scalar(tag, 0.1, step, walltime=100.0 + 0.5 * step + (0.01 if tag == "lr" else 0))
    writer.close()
    rate = bench.loop_rate(tmp_path)
    assert rate["timed_steps"] == 4 and rate["steps_per_s"] == pytest.approx(2.0)
    writer = SummaryWriter(str(tmp_path / "short"))
    writer.add_scalar("loss", 0.1, 0, walltime=1.0)
    writer.close()
    with pytest.raises(RuntimeError, match="logged step"):
        bench.loop_rate(tmp_path / "short")


def test_script_lora_format_loads_into_our_sampler(bench, tiny_sd, tmp_path, one_thread):
    """The script's output (a peft-wrapped UNet saved with save_lora_weights and save_pretrained) becomes a
    student whose denoiser equals the peft model's, and whose 4-step samples equal stock diffusers'."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from diffdistill.lora import DEFAULT_TARGETS

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    peft_unet = get_peft_model(unet, LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS)))
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "unet_lora"), get_peft_model_state_dict(peft_unet))
    peft_unet.save_pretrained(str(tmp_path))  # adapter_config.json: alpha 8 (scale 2) is only recorded here

    lora_file = bench.normalize_reference_lora(tmp_path, tmp_path / "normalized")
    teacher, student = bench.reference_student(tiny_sd, lora_file, LCM_GRID_4_OF_50)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 259])
    emb = torch.randn(2, 77, 32)
    with torch.no_grad(), student.backbone.adapter(student.adapter):
        ours = teacher.backbone.denoiser(x, t, encoder_hidden_states=emb).sample
        theirs = peft_unet(x, t, encoder_hidden_states=emb).sample
        with peft_unet.disable_adapter():
            base = peft_unet(x, t, encoder_hidden_states=emb).sample
    assert (theirs - base).abs().max() > 1e-2  # the LoRA matters
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert bench.lcm_grid(tiny_sd, 4, 50) == pytest.approx(LCM_GRID_4_OF_50)
    assert bench.stock_gap(tiny_sd, lora_file.parent, (teacher, student)) < 1e-4
