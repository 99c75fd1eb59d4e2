"""Typed run configuration: dataclasses per section, loaded from YAML plus ``key.sub=value`` overrides.

Sections: ``teacher``, ``student``, ``objective`` (parsed by the chosen objective's own nested
``Config`` dataclass), ``data``, ``train``, ``eval``, ``attention``. Unknown keys (with a
did-you-mean), wrong types and impossible values are rejected with the dotted key named, before any
model is loaded. CFG scales follow diffusers' convention (1 = no guidance): ``uncond + s (cond - uncond)``.
A number a paper or script gives in Ho & Salimans' form ``(1 + w) cond - w uncond`` (w = 0: none) can be
written as it was published with the YAML tag ``!ho_salimans w`` (in files and in overrides): it is converted
to the diffusers scale ``w + 1`` as the config is read, never inside the maths.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_TEACHER = str(Path(__file__).resolve().parent.parent / "assets" / "teachers" / "digits-sd")


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


class ConfigError(ValueError):
    """A configuration problem, naming the dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


@dataclass
class TeacherConfig:
    path: str = EMBEDDED_TEACHER  # hub id or local diffusers pipeline folder
    dtype: str = "float32"  # the frozen teacher's storage dtype; trainable tensors are fp32 masters whatever it is
    resolution: int | None = None  # image side in pixels; default the pipeline's native size (SDXL-Turbo: 512)
    vae: str | None = None  # a replacement VAE (hub id or folder, e.g. an fp16-fix VAE); None: the pipeline's own

    def validate(self, p: str) -> None:
        _check(bool(self.path), f"{p}.path", "must name a hub id or a local diffusers folder")
        _check(self.resolution is None or (isinstance(self.resolution, int) and not isinstance(self.resolution, bool)
                                           and self.resolution > 0),
               f"{p}.resolution", f"must be a positive number of pixels or null, got {self.resolution!r}")
        _check(self.dtype in ("float32", "float16", "bfloat16"), f"{p}.dtype",
               f"must be float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.vae is None or bool(self.vae), f"{p}.vae", "must name a hub id or a folder, or be null")


@dataclass
class StudentConfig:
    kind: str = "full"  # full | lora
    lora_rank: int = 16
    lora_alpha: float | None = None  # default: = rank
    lora_targets: list[str] | None = None  # default: lora.DEFAULT_TARGETS
    timesteps: list[float] = field(default_factory=lambda: [1.0])  # continuous t, strictly decreasing
    guidance: float = 1.0  # CFG scale used when sampling the student (diffusers convention)
    guidance_embedding_dim: int = 0  # full students: > 0 adds LCM's guidance embedding (time_cond_proj_dim, LCM: 256)
    gamma: float = 1.0  # sampler stochasticity: 1 = LCM's re-noising, 0 = deterministic DDIM (PCM), TCD's gamma between
    init: str | None = None  # an exported student (diffdistill export / a run's final/) whose weights start this one

    def validate(self, p: str) -> None:
        _check(self.kind in ("full", "lora"), f"{p}.kind", f"must be 'full' or 'lora', got {self.kind!r}")
        _check(self.lora_rank > 0, f"{p}.lora_rank", f"must be positive, got {self.lora_rank}")
        _check(len(self.timesteps) > 0, f"{p}.timesteps", "needs at least one time")
        _check(all(0.0 < t <= 1.0 for t in self.timesteps), f"{p}.timesteps", f"must lie in (0, 1], got {self.timesteps}")
        _check(all(b < a for a, b in zip(self.timesteps, self.timesteps[1:])), f"{p}.timesteps",
               f"must be strictly decreasing, got {self.timesteps}")
        _check(self.guidance >= 1.0, f"{p}.guidance", f"is a diffusers CFG scale (1 = none), must be >= 1, got {self.guidance}")
        _check(0.0 <= self.gamma <= 1.0, f"{p}.gamma", f"must lie in [0, 1], got {self.gamma}")
        _check(self.guidance_embedding_dim >= 0, f"{p}.guidance_embedding_dim",
               f"must be >= 0, got {self.guidance_embedding_dim}")
        _check(self.guidance_embedding_dim == 0 or self.kind == "full", f"{p}.guidance_embedding_dim",
               "needs student.kind=full (a LoRA student shares the teacher's network, which has no guidance embedding)")
        _check(self.init is None or Path(self.init).is_dir(), f"{p}.init",
               f"must be the folder of an exported student (diffdistill export, or a run's final/), got {self.init!r}")


@dataclass
class DataConfig:
    prompts: str = "digits"  # 'digits' | a .txt (one per line) | .csv / .jsonl with `caption_column`
    caption_column: str = "caption"
    images: str | None = None  # real images for objectives that use them: 'digits' | a folder | .tar shards
    min_prompts: int = 10_000  # objectives that train on prompts alone refuse a smaller prompt file (0: no minimum)

    def validate(self, p: str) -> None:
        _check(self.min_prompts >= 0, f"{p}.min_prompts", f"must be >= 0, got {self.min_prompts}")
        if self.images is not None:
            spec = self.images
            _check(not spec.startswith("pipe:"), f"{p}.images", "'pipe:' URLs run shell commands and are refused; "
                   "give a local path or an https:// / s3:// URL")
            _check(spec == "digits" or ".tar" in spec or "://" in spec or Path(spec).is_dir(), f"{p}.images",
                   f"must be 'digits', an existing image folder or webdataset .tar shards, got {spec!r}")
        _check(bool(self.prompts), f"{p}.prompts", "must be 'digits' or a prompt file")
        if self.prompts != "digits":
            _check(Path(self.prompts).suffix in (".txt", ".csv", ".jsonl"), f"{p}.prompts",
                   f"must be 'digits' or a .txt/.csv/.jsonl file, got {self.prompts!r}")
            _check(Path(self.prompts).is_file(), f"{p}.prompts", f"file {self.prompts!r} does not exist")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8  # per process and micro-step: global batch = batch_size x processes x accumulation
    lr: float = 1e-5
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | linear | cosine (diffusers' get_scheduler)
    lr_warmup_steps: int = 0  # in training steps (a phase updating every k-th step warms up over its updates in them)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW, every phase
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | a checkpoint folder
    init_from: str | None = None  # a checkpoint or run folder: every trained group it holds starts from its weights
    resume_allow_changes: list[str] = field(default_factory=list)  # config keys a resume may change knowingly
    process_group_timeout: int | None = None  # seconds a collective may wait (None: torch's default, 10 min for NCCL)
    sample_every: int = 250
    log_every: int = 10
    grad_clip: float = 1.0
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU only)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers: tensorboard, wandb
    gradient_checkpointing: bool = False
    ema_decay: float = 0.999  # per student update (phases that update the student every k-th step: every k-th)
    max_consecutive_nonfinite: int = 10

    def validate(self, p: str) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "sample_every", "log_every",
                     "gradient_accumulation", "max_consecutive_nonfinite"):
            _check(getattr(self, name) > 0, f"{p}.{name}", f"must be positive, got {getattr(self, name)}")
        _check(self.lr > 0, f"{p}.lr", f"must be positive, got {self.lr}")
        _check(self.lr_scheduler in LR_SCHEDULERS, f"{p}.lr_scheduler",
               f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        _check(len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas), f"{p}.adam_betas",
               f"must be two numbers in [0, 1), got {self.adam_betas}")
        _check(self.adam_eps > 0, f"{p}.adam_eps", f"must be positive, got {self.adam_eps}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.lr_warmup_steps >= 0, f"{p}.lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        _check(self.grad_clip > 0, f"{p}.grad_clip", f"must be positive, got {self.grad_clip}")
        _check(0.0 < self.ema_decay < 1.0, f"{p}.ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), f"{p}.mixed_precision",
               f"must be no, fp16 or bf16, got {self.mixed_precision!r}")
        _check(bool(self.output_dir), f"{p}.output_dir", "must be a folder path")
        _check(self.process_group_timeout is None or self.process_group_timeout > 0, f"{p}.process_group_timeout",
               f"must be a positive number of seconds or null, got {self.process_group_timeout}")
        for i, tracker in enumerate(self.log_with):
            _check(tracker in ("tensorboard", "wandb"), f"{p}.log_with[{i}]",
                   f"must be tensorboard or wandb (or leave the list empty), got {tracker!r}")


@dataclass
class EvalConfig:
    protocol: str = "digits"
    num_images: int = 200
    every: int = 0  # 0: no evaluation during training
    captions: str | None = None  # COCO protocols: the captions_*.json file
    images: str | None = None  # COCO protocols: the matching image folder

    def validate(self, p: str) -> None:
        from .eval.protocols import PROTOCOLS

        _check(self.num_images > 0, f"{p}.num_images", f"must be positive, got {self.num_images}")
        _check(self.every >= 0, f"{p}.every", f"must be >= 0, got {self.every}")
        close = difflib.get_close_matches(self.protocol, list(PROTOCOLS), n=1)
        _check(self.protocol in PROTOCOLS, f"{p}.protocol", f"unknown protocol {self.protocol!r}"
               + (f"; did you mean {close[0]!r}?" if close else f"; one of {sorted(PROTOCOLS)}"))
        if self.protocol == "digits":
            _check(self.num_images % 10 == 0 and self.num_images >= 20, f"{p}.num_images",
                   f"digits needs a multiple of 10 and >= 20, got {self.num_images}")
        elif self.every:
            _check(self.captions is not None and Path(self.captions).is_file(), f"{p}.captions",
                   f"protocol {self.protocol!r} needs a local COCO captions file, got {self.captions!r}")
            _check(self.images is not None and Path(self.images).is_dir(), f"{p}.images",
                   f"protocol {self.protocol!r} needs a local COCO image folder, got {self.images!r}")


# diffdistill.kernels.NAMES plus "default" (kept literal here so that loading a config imports no kernels)
ATTENTION_BACKENDS = ("default", "auto", "sdpa", "math", "triton", "triton_jvp", "block_sparse", "xformers")


@dataclass
class AttentionConfig:
    backend: str = "default"  # "default": the denoisers' own processors; else diffdistill.kernels.use_attention
    density: float = 0.5      # block_sparse: fraction of key tiles each query tile keeps

    def validate(self, p: str) -> None:
        close = difflib.get_close_matches(self.backend, ATTENTION_BACKENDS, n=1)
        _check(self.backend in ATTENTION_BACKENDS, f"{p}.backend", f"unknown backend {self.backend!r}"
               + (f"; did you mean {close[0]!r}?" if close else f"; one of {list(ATTENTION_BACKENDS)}"))
        _check(0.0 < self.density <= 1.0, f"{p}.density", f"must be in (0, 1], got {self.density}")


@dataclass
class Config:
    teacher: TeacherConfig
    student: StudentConfig
    objective: Any  # the objective's own Config dataclass, with a `name`
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    attention: AttentionConfig


SECTIONS = {"teacher": TeacherConfig, "student": StudentConfig, "data": DataConfig, "train": TrainConfig,
            "eval": EvalConfig, "attention": AttentionConfig}


def _coerce(value, tp, key: str):
    """``value`` checked against the annotation ``tp`` (int, float, str, bool, list[...], X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML reads '3e-4' (no dot) as a string: accept any float literal
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def build_section(cls, data: dict | None, prefix: str):
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types name the dotted key."""
    data = dict(data or {})
    _check(isinstance(data, dict), prefix, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}.{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}.{key}", f"unknown key{hint}")
    obj = cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in data.items()})
    for f in dataclasses.fields(obj):  # every number must be finite (an inf lr or guidance trains nothing sane)
        value = getattr(obj, f.name)
        for v in value if isinstance(value, list) else [value]:
            _check(not isinstance(v, float) or math.isfinite(v), f"{prefix}.{f.name}", f"must be finite, got {value!r}")
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus the ``!ho_salimans`` tag (see the module docstring)."""


def _ho_salimans(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node)
    try:
        w = float(text)
    except ValueError:
        raise ConfigError(f"!ho_salimans {text}", "takes a number, the guidance weight w of (1 + w) cond - w uncond") from None
    if w < 0:
        raise ConfigError(f"!ho_salimans {text}", "w must be >= 0 (w = 0: no guidance)")
    return w + 1.0


_ConfigLoader.add_constructor("!ho_salimans", _ho_salimans)


def parse_yaml(text: str):
    """YAML as configs read it: safe types only, plus ``!ho_salimans w`` -> ``w + 1``."""
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


def apply_override(raw: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``raw``."""
    if "=" not in override:
        raise ConfigError(override, "an override must look like section.key=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        _check(isinstance(node, dict), key, "cannot set a sub-key of a non-mapping value")
    node[parts[-1]] = parse_yaml(value)


def config_from_dict(raw: dict) -> Config:
    from .objectives import OBJECTIVES

    raw = dict(raw or {})
    known = list(SECTIONS) + ["objective"]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(key, "unknown section" + (f"; did you mean '{close[0]}'?" if close else ""))
    objective = dict(raw.get("objective") or {})
    name = objective.pop("name", None)
    _check(name is not None, "objective.name", f"is required; one of {sorted(OBJECTIVES)}")
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1)
        raise ConfigError("objective.name", f"unknown objective {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                                                             else f"; one of {sorted(OBJECTIVES)}"))
    sections = {k: build_section(cls, raw.get(k), k) for k, cls in SECTIONS.items()}
    obj_cfg = build_section(OBJECTIVES[name].Config, objective, "objective")
    config = Config(objective=obj_cfg, **sections)
    _check(not (config.student.init and config.train.init_from), "train.init_from",
           "starts every trained group from a checkpoint, student.init the student alone from an export: give one")
    obj_cfg.validate_run(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A :class:`Config` from a YAML file (or defaults) plus ``key.sub=value`` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = parse_yaml(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(str(path), "the YAML file must hold a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(config: Config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        out[f.name] = dataclasses.asdict(section)
    out["objective"] = {"name": config.objective.name, **out["objective"]}
    return out


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# -- checked resume ------------------------------------------------------------------------------------------
# keys a resume may change without being asked (cadence, bookkeeping, evaluation); train.max_steps too, with its
# consequence for the LR schedule stated
RESUME_MAY_CHANGE = ("train.max_steps", "train.log_every", "train.sample_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.resume", "train.log_with", "train.resume_allow_changes",
                     "train.output_dir", "train.init_from", "train.max_consecutive_nonfinite",
                     "train.process_group_timeout", "eval.")
# keys that change what the checkpoint's tensors are: never resumed across
RESUME_STRUCTURAL = ("objective.name", "teacher.path", "student.kind", "student.lora_rank", "student.lora_targets",
                     "student.guidance_embedding_dim", "objective.fake_score", "objective.fake_lora_rank",
                     "objective.fake_lora_targets", "objective.fake_per_step", "objective.disc_levels",
                     "objective.disc_head_width", "objective.disc_network")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume(saved_yaml: str, config: Config) -> list[str]:
    """A resume of ``config`` from a checkpoint made with the config ``saved_yaml``: refuse every changed key
    outside :data:`RESUME_MAY_CHANGE` and ``train.resume_allow_changes`` (structural ones, :data:`RESUME_STRUCTURAL`,
    always), naming each with its old and new value; returns one line per accepted change. Keys the checkpoint's
    config lacks (added by a later version) are not compared."""
    old, new = _flat(yaml.safe_load(saved_yaml) or {}), _flat(config_to_dict(config))
    if old.get("objective.fake_score") == "auto":  # before 'auto' was removed: a copy for full students, else an adapter
        old["objective.fake_score"] = "full" if old.get("student.kind") == "full" else "lora"
    changed = [(k, old[k], v) for k, v in new.items() if k in old and old[k] != v]
    allowed = set(config.train.resume_allow_changes)

    def may(key: str) -> bool:
        return key in allowed or any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MAY_CHANGE)

    structural = [c for c in changed if c[0] in RESUME_STRUCTURAL]
    refused = structural or [c for c in changed if not may(c[0])]
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        how = ("these change what the checkpoint's tensors are; train into a new train.output_dir" if structural else
               "set train.resume_allow_changes=[" + ", ".join(k for k, _, _ in refused) + "] to resume anyway, or "
               "train into a new train.output_dir")
        raise ConfigError("train.resume", f"the checkpoint was made with another config: {listed}; {how}")
    notes = []
    for key, a, b in changed:
        note = f"resume with {key} changed: {a!r} -> {b!r}"
        if key == "train.max_steps" and config.train.lr_scheduler not in ("constant", "constant_with_warmup"):
            note += f" (the {config.train.lr_scheduler} LR schedule now spans {b} steps from here on)"
        elif key in allowed and key not in ("train.resume_allow_changes",):
            note += " (allowed by train.resume_allow_changes)"
        notes.append(note)
    return notes
