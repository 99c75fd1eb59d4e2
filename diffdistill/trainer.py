"""The one training loop (accelerate), method-agnostic: objectives declare phases and losses; this file
turns them into optimizer steps, EMA, logging, samples and checkpoints.

Per step, per due phase (``step % phase.every == 0``): make only that phase's parameters trainable,
accumulate ``train.gradient_accumulation`` micro-batches of ``objective.loss``, clip, step that
phase's optimizer and LR scheduler. A non-finite loss or gradient skips the update, is logged and
counted; ``train.max_consecutive_nonfinite`` skips in a row abort, naming the phase and term.
Micro-batch prompts and noise are a pure function of (seed, step, micro-step, rank), so a resumed
run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config, dump_config
from .data import load_prompts, prompt_batch
from .ema import EMA
from .images import save_grid
from .objectives import OBJECTIVES, Batch, Objective

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates in one phase."""


@dataclass
class RunState:
    step: int = 0
    skipped: dict[str, int] = field(default_factory=dict)      # total skipped updates per phase
    consecutive: dict[str, int] = field(default_factory=dict)  # current run of skips per phase


class Trainer:
    def __init__(self, config: Config, accelerator=None):
        from accelerate import Accelerator

        self.cfg, tc = config, config.train
        self.run_dir = Path(tc.output_dir)
        self.acc = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision if torch.cuda.is_available() else "no",
            log_with="tensorboard", project_dir=str(self.run_dir / "logs"))
        self.log = self.acc.print
        self._build()

    # -- construction ---------------------------------------------------------------------------
    def _build(self) -> None:
        from .pipeline import load_teacher
        from .student import build_student

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self.prompts = load_prompts(cfg.data.prompts, cfg.data.caption_column)  # fails before any model loads
        self.teacher = load_teacher(cfg.teacher.path, dtype=DTYPES[cfg.teacher.dtype], device=self.acc.device)
        self.student = build_student(self.teacher, cfg.student)
        if cfg.train.gradient_checkpointing:
            self.student.backbone.denoiser.enable_gradient_checkpointing()
        self.objective: Objective = OBJECTIVES[type(cfg.objective).name](cfg.objective, self.teacher, self.student,
                                                                         self.prompts)
        self.groups = self.objective.trainable()  # name -> {param name: param}
        self.phases = self.objective.phases()
        for phase in self.phases:
            unknown = [m for m in phase.modules if m not in self.groups]
            if unknown:
                raise ValueError(f"phase {phase.name!r} trains unknown modules {unknown}; known: {list(self.groups)}")
        self.optimizers, self.schedulers = {}, {}
        for phase in self.phases:
            params = [p for m in phase.modules for p in self.groups[m].values()]
            # prepared by accelerate: with fp16 its optimizer wrapper runs the gradient scaler
            opt = self.acc.prepare_optimizer(torch.optim.AdamW(params, lr=self.cfg.train.lr, weight_decay=0.0))
            self.optimizers[phase.name] = opt
            self.schedulers[phase.name] = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: 1.0)
        self.ema = EMA(self.groups["student"], decay=cfg.train.ema_decay)
        self.state = RunState(skipped={p.name: 0 for p in self.phases}, consecutive={p.name: 0 for p in self.phases})

    def _activate(self, phase) -> list[torch.nn.Parameter]:
        """The one place that toggles ``requires_grad``: on for this phase's groups, off for the rest."""
        live = {id(p) for m in phase.modules for p in self.groups[m].values()}
        params = []
        for group in self.groups.values():
            for p in group.values():
                p.requires_grad_(id(p) in live)
                if id(p) in live:
                    params.append(p)
        return params

    # -- one phase update -------------------------------------------------------------------------
    def _update(self, phase, step: int) -> dict:
        params = self._activate(phase)
        opt, accum = self.optimizers[phase.name], self.cfg.train.gradient_accumulation
        opt.zero_grad(set_to_none=True)
        terms_sum: dict[str, float] = {}
        bad_term = None
        for micro in range(accum):
            prompts, g = prompt_batch(self.prompts, self.cfg.train.batch_size, self.cfg.train.seed, step, micro,
                                      self.acc.process_index)
            with self.acc.autocast():
                out = self.objective.loss(phase.name, Batch(prompts, g, step), step)
            if not torch.isfinite(out.total):
                bad_term = next((k for k, v in out.terms.items() if not torch.isfinite(v).all()), "total")
                break
            self.acc.backward(out.total / accum)
            for k, v in out.terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / accum
        grad_norm = float("nan")
        if bad_term is None:
            grad_norm = float(self.acc.clip_grad_norm_(params, self.cfg.train.grad_clip))  # unscales under fp16
            if not math.isfinite(grad_norm):
                bad_term = "gradient"
                if self.acc.scaler is not None:  # fp16 overflow: the scaler skips this step and lowers its scale
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    self.state.skipped[phase.name] += 1
                    return {**record_base(step, phase, terms_sum, grad_norm, self.schedulers[phase.name]),
                            "skipped": True, "nonfinite": "gradient (fp16 overflow, loss scale lowered)"}
        record = record_base(step, phase, terms_sum, grad_norm, self.schedulers[phase.name])
        if bad_term is not None:
            opt.zero_grad(set_to_none=True)
            self.state.skipped[phase.name] += 1
            self.state.consecutive[phase.name] += 1
            record.update(skipped=True, nonfinite=bad_term)
            self.log(f"step {step}: non-finite {bad_term} in phase {phase.name!r}; update skipped "
                     f"({self.state.skipped[phase.name]} skipped so far)")
            if self.state.consecutive[phase.name] >= self.cfg.train.max_consecutive_nonfinite:
                record["abort"] = (f"phase {phase.name!r}: {self.state.consecutive[phase.name]} consecutive "
                                   f"non-finite updates (last: {bad_term}); aborting")
            return record
        opt.step()
        self.schedulers[phase.name].step()
        opt.zero_grad(set_to_none=True)
        self.state.consecutive[phase.name] = 0
        return record

    # -- checkpoints ----------------------------------------------------------------------------
    def _state_tensors(self) -> tuple[dict, dict]:
        tensors = {f"param.{g}.{k}": p.detach() for g, group in self.groups.items() for k, p in group.items()}
        tensors.update(ckpt.prefixed("ema", self.ema.state_dict()))
        meta = {"step": self.state.step, "skipped": self.state.skipped, "consecutive": self.state.consecutive,
                "ema_updates": self.ema.num_updates, "optimizers": {}, "schedulers": {},
                "rng": {"python": random.getstate(), "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                                                              for v in np.random.get_state()]}}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        for name, opt in self.optimizers.items():
            t, m = ckpt.optimizer_tensors(opt, prefix=f"optim.{name}")
            tensors.update(t)
            meta["optimizers"][name] = m
            meta["schedulers"][name] = self.schedulers[name].state_dict()
        return tensors, meta

    def save_checkpoint(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        tensors, meta = self._state_tensors()
        return ckpt.write_checkpoint(self.run_dir, self.state.step, tensors, meta, dump_config(self.cfg),
                                     self.cfg.train.keep_checkpoints)

    def _restore(self, tensors: dict, meta: dict) -> None:
        with torch.no_grad():
            for g, group in self.groups.items():
                for k, p in group.items():
                    p.copy_(tensors[f"param.{g}.{k}"])
        self.ema.load_state_dict(ckpt.unprefixed("ema", tensors), meta["ema_updates"])
        for name, opt in self.optimizers.items():
            ckpt.load_optimizer(opt, tensors, meta["optimizers"][name], prefix=f"optim.{name}")
            self.schedulers[name].load_state_dict(meta["schedulers"][name])
        py = meta["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state(tuple(np.array(v, dtype=np.uint32) if i == 1 else v
                                  for i, v in enumerate(meta["rng"]["numpy"])))
        torch.set_rng_state(tensors["rng.torch"])
        self.state = RunState(meta["step"], dict(meta["skipped"]), dict(meta["consecutive"]))

    # -- samples ----------------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        prompts = [f"a handwritten digit {d}" for d in range(10)] if self.cfg.data.prompts == "digits" \
            else self.prompts[:8]
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        noise = torch.randn((len(prompts), *self.teacher.latent_shape), generator=g).to(self.teacher.device)
        uncond = self.teacher.empty_cond(len(prompts)) if self.student.guidance != 1.0 else None
        live = {k: p.detach().clone() for k, p in self.groups["student"].items()}
        self.ema.copy_to(self.groups["student"])  # EMA weights for sampling
        try:
            latents = self.student.generate(noise, self.teacher.encode_prompt(prompts), uncond, generator=g)
        finally:
            with torch.no_grad():
                for k, p in self.groups["student"].items():
                    p.copy_(live[k])
        images = (self.teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
        return save_grid(images.cpu(), self.run_dir / "samples" / f"step-{self.state.step:06d}.png",
                         nrow=len(prompts), upscale=2)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.clean_partial(self.run_dir)
        if removed:
            self.log(f"removed {len(removed)} incomplete checkpoint folder(s) left by an interrupted save")
        found = ckpt.find_resume(self.run_dir, tc.resume, log=self.log)
        if found is not None:
            tensors, meta, folder = found
            self._restore(tensors, meta)
            self.log(f"resumed from {folder} at step {self.state.step}")
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        self.objective.prepare(self.run_dir, self.acc.device)
        self.acc.init_trackers("diffdistill")
        metrics = (self.run_dir / "metrics.jsonl").open("a")
        bar = tqdm(range(self.state.step, tc.max_steps), initial=self.state.step, total=tc.max_steps,
                   desc="train", disable=not self.acc.is_local_main_process)
        for step in bar:
            records = [self._update(phase, step) for phase in self.phases if step % phase.every == 0]
            self.ema.update(self.groups["student"])
            self.state.step = step + 1
            for r in records:
                metrics.write(json.dumps(r) + "\n")
                self.acc.log({f"{r['phase']}/{k}": v for k, v in r.items()
                              if isinstance(v, float) and math.isfinite(v)}, step=step)
            aborts = [r["abort"] for r in records if "abort" in r]
            if aborts:
                metrics.close()
                raise NonFiniteError(aborts[0])
            if step % tc.log_every == 0:
                metrics.flush()
                bar.set_postfix({k: f"{v:.4g}" for r in records for k, v in r.items()
                                 if isinstance(v, float) and k not in ("lr",)})
            if self.state.step % tc.sample_every == 0 or self.state.step == tc.max_steps:
                self.save_samples()
            if self.state.step % tc.checkpoint_every == 0 or self.state.step == tc.max_steps:
                self.save_checkpoint()
            self.acc.wait_for_everyone()
        metrics.close()
        self.acc.end_training()
        return self.run_dir


def record_base(step: int, phase, terms: dict, grad_norm: float, scheduler) -> dict:
    return {"step": step, "phase": phase.name, **terms, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]}


def train(config: Config) -> Path:
    """Train ``config`` to ``train.max_steps``; returns the run folder."""
    return Trainer(config).run()
