"""The one training loop (accelerate), method-agnostic: objectives declare phases and losses; this file
turns them into optimizer steps, EMA, logging, samples and checkpoints.

Per step, per due phase (``step % phase.every == 0``): make only that phase's parameters trainable,
accumulate ``train.gradient_accumulation`` micro-batches of ``objective.loss``, clip, step that
phase's optimizer and LR scheduler. A non-finite loss or gradient skips the update, is logged and
counted; ``train.max_consecutive_nonfinite`` skips in a row abort, naming the phase and term. The student's
EMA moves once per student update (so its decay is per update, whatever the update ratio).
Every sample's prompt, image and noise are a pure function of (seed, step, global sample index)
(``batch.py``), so a resumed run is bitwise identical to an uninterrupted one, and a run split over
processes or micro-batches sees the same global batch as one process.

Several processes (``accelerate launch`` / ``torchrun``): the objective module -- which holds every
trainable parameter -- is wrapped by ``accelerator.prepare`` (DDP, ``find_unused_parameters`` since
each phase leaves the other phases' parameters out of its graph); every phase's backward therefore
averages gradients over processes. Decisions that must agree (skip a non-finite update) are reduced
over processes first; checkpoints, samples and logs are written by the main process only, and no
collective runs on one rank alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batch import Batch, micro_batch
from .config import Config, check_resume, dump_config
from .ema import EMA
from .images import save_grid
from .objectives import LossOut, Objective
from .sources import load_images, load_prompts

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates in one phase."""


class Preempted(SystemExit):
    """SIGTERM or SIGUSR1 (what schedulers such as SLURM send before ending a job) arrived: the run saved a
    checkpoint at the next step boundary and stops with exit status 128 + the signal number (SIGTERM: 143);
    ``train.resume=auto`` continues it."""


class StopSignals:
    """Records SIGTERM / SIGUSR1 while training (main thread only) instead of dying at once; restores the previous
    handlers on exit."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunState:
    step: int = 0
    skipped: dict[str, int] = field(default_factory=dict)      # total skipped updates per phase
    consecutive: dict[str, int] = field(default_factory=dict)  # current run of skips per phase


class Trainer:
    def __init__(self, config: Config, accelerator=None):
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.cfg, tc = config, config.train
        self.run_dir = Path(tc.output_dir)
        cuda = torch.cuda.is_available()
        self.acc = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision if cuda else "no", cpu=not cuda,  # cpu: gloo under torchrun
            log_with=tc.log_with or None, project_dir=str(self.run_dir / "logs"),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True), *(
                [InitProcessGroupKwargs(timeout=timedelta(seconds=tc.process_group_timeout))]
                if tc.process_group_timeout else [])])  # e.g. while the main process makes a teacher-pair pool
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.acc.num_processes:
            raise RuntimeError(f"launched as {launched} processes but accelerate sees {self.acc.num_processes}: "
                               "each would train alone. Launch with torchrun or `accelerate launch` (see README)")
        self.log = self.acc.print
        self.claim_run_dir()  # before anything is loaded or written
        self._build()

    # -- construction ---------------------------------------------------------------------------
    def _build(self) -> None:
        from .assembly import assemble, check_prompt_set
        from .pipeline import load_teacher

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self.prompts = load_prompts(cfg.data.prompts, cfg.data.caption_column)  # fails before any model loads
        check_prompt_set(cfg, self.prompts)
        self.teacher = load_teacher(cfg.teacher.path, dtype=DTYPES[cfg.teacher.dtype], device=self.acc.device,
                                    resolution=cfg.teacher.resolution, vae=cfg.teacher.vae)
        self.images = load_images(cfg.data.images, self.teacher.image_size, cfg.data.caption_column)
        run = assemble(cfg, self.teacher, self.prompts)
        self.student, self.objective, self.groups, self.phases = run.student, run.objective, run.groups, run.phases
        self.model = self._distribute(self.objective)
        self.optimizers, self.schedulers = {}, {}
        for phase in self.phases:
            params = [p for m in phase.modules for p in self.groups[m].values()]
            # prepared by accelerate: with fp16 its optimizer wrapper runs the gradient scaler
            tc = self.cfg.train
            opt = self.acc.prepare_optimizer(torch.optim.AdamW(params, lr=phase.lr or tc.lr, betas=tuple(tc.adam_betas),
                                                               eps=tc.adam_eps, weight_decay=tc.weight_decay))
            self.optimizers[phase.name] = opt
            self.schedulers[phase.name] = self._lr_scheduler(opt.optimizer, phase)
        self.ema = EMA(self.groups["student"], decay=cfg.train.ema_decay)
        self.state = RunState(skipped={p.name: 0 for p in self.phases}, consecutive={p.name: 0 for p in self.phases})

    def _distribute(self, objective: Objective) -> torch.nn.Module:
        """The module whose forward computes a phase's loss: the objective itself on one process, its DDP
        wrapper (accelerate) on several. DDP registers parameters that require grad, so all are on here."""
        owned = {id(p) for p in objective.parameters()}
        stray = [f"{g}.{k}" for g, group in self.groups.items() for k, p in group.items() if id(p) not in owned]
        if stray:
            raise ValueError(f"trainable parameters outside the objective module (not synchronised across "
                             f"processes): {stray[:3]}...; register their modules as attributes of the objective")
        if self.acc.num_processes == 1:
            return objective
        for group in self.groups.values():
            for p in group.values():
                p.requires_grad_(True)
        return self.acc.prepare_model(objective)

    def _lr_scheduler(self, optimizer, phase):
        """diffusers' ``get_scheduler`` over the phase's own updates; warm-up and decay are counted in training
        steps (``train.lr_warmup_steps``, ``train.max_steps``), so a phase that updates every k-th step warms up
        over the same steps as one that updates every step -- as DMD2's code steps both schedulers every
        iteration."""
        from diffusers.optimization import get_scheduler

        tc = self.cfg.train
        return get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=math.ceil(tc.lr_warmup_steps / phase.every),
                             num_training_steps=math.ceil(tc.max_steps / phase.every))

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

    # -- one phase's loss: the seam the loop and the objective tests share ----------------------------
    def micro_batch(self, step: int, micro: int = 0, batch_size: int | None = None) -> Batch:
        """This process's micro-batch ``micro`` of ``step`` (``batch_size``: ``train.batch_size``), as the loop
        draws it: the same prompts, images and noise whenever it is asked for again."""
        tc = self.cfg.train
        return micro_batch(self.prompts, batch_size or tc.batch_size, tc.seed, step, micro, self.acc.process_index,
                           self.acc.num_processes, self.images)

    def phase(self, name: str):
        """The objective's phase called ``name``."""
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise ValueError(f"{type(self.objective).__name__} has phases {[p.name for p in self.phases]}; got {name!r}")

    def phase_loss(self, phase, batch: Batch, step: int = 0) -> LossOut:
        """Phase ``phase`` (a name or a :class:`Phase`)'s loss on ``batch`` with only that phase's parameters
        trainable: what one micro-step of the loop backpropagates (no gradient reset, no optimizer step)."""
        phase = self.phase(phase) if isinstance(phase, str) else phase
        self._activate(phase)
        with self.acc.autocast():
            return self.model(phase.name, batch, step)

    # -- one phase update -------------------------------------------------------------------------
    def _update(self, phase, step: int) -> dict:
        params = self._activate(phase)
        opt, accum = self.optimizers[phase.name], self.cfg.train.gradient_accumulation
        opt.zero_grad(set_to_none=True)
        terms_sum: dict[str, float] = {}
        bad_term = None
        for micro in range(accum):
            batch = self.micro_batch(step, micro)
            # DDP averages gradients on the last micro-step only; every rank runs every backward, even
            # a non-finite one, so no rank waits on a collective the others skipped
            sync = micro == accum - 1 or self.model is self.objective
            with self.acc.autocast(), (contextlib.nullcontext() if sync else self.acc.no_sync(self.model)):
                out = self.model(phase.name, batch, step)
                if bad_term is None and not torch.isfinite(out.total):
                    bad_term = next((k for k, v in out.terms.items() if not torch.isfinite(v).all()), "total")
                self.acc.backward(out.total / accum)
            for k, v in out.terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / accum
        if self.acc.num_processes > 1:  # one collective: log the global means, skip everywhere if any rank must
            keys = sorted(terms_sum)
            local = torch.tensor([float(bad_term is not None)] + [terms_sum[k] for k in keys], device=self.acc.device)
            total = self.acc.reduce(local, "sum").cpu()
            terms_sum = {k: float(v) / self.acc.num_processes for k, v in zip(keys, total[1:])}
            if bad_term is None and float(total[0]) > 0:
                bad_term = "total (on another process)"
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
        self.objective.after_update(phase.name)
        self.state.consecutive[phase.name] = 0
        return record

    # -- checkpoints ----------------------------------------------------------------------------
    def _state_tensors(self) -> tuple[dict, dict]:
        tensors = {f"param.{g}.{k}": p.detach() for g, group in self.groups.items() for k, p in group.items()}
        tensors.update(ckpt.prefixed("ema", self.ema.state_dict()))
        tensors.update(ckpt.prefixed("objective", self.objective.extra_state()))
        meta = {"step": self.state.step, "skipped": self.state.skipped, "consecutive": self.state.consecutive,
                "ema_updates": self.ema.num_updates, "optimizers": {}, "schedulers": {}, "rng": []}
        for rank, state in enumerate(self._gather_rng()):  # one entry per process
            meta["rng"].append({"python": state["python"], "numpy": state["numpy"]})
            for key in ("torch", "cuda"):
                if key in state:
                    tensors[f"rng.{key}.{rank}"] = state[key]
        for name, opt in self.optimizers.items():
            t, m = ckpt.optimizer_tensors(opt, prefix=f"optim.{name}")
            tensors.update(t)
            meta["optimizers"][name] = m
            meta["schedulers"][name] = self.schedulers[name].state_dict()
        return tensors, meta

    def _gather_rng(self) -> list[dict]:
        """Every process's RNG states (a collective: called on all ranks)."""
        state = {"python": random.getstate(),
                 "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().cpu()
        if self.acc.num_processes == 1:
            return [state]
        from accelerate.utils import gather_object

        return gather_object([state])

    def save_checkpoint(self) -> Path | None:
        """Called on every process (the RNG gather is collective); the main process writes. A non-finite trained
        weight or EMA value is never written as a complete checkpoint (nor can it prune the good ones): the run
        stops, naming the tensor (every process holds the same weights, so every process stops)."""
        tensors, meta = self._state_tensors()
        bad = next((k for k, v in tensors.items() if k.startswith(("param.", "ema.")) and v.is_floating_point()
                    and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise NonFiniteError(f"step {self.state.step}: {bad} holds non-finite values; no checkpoint written (the "
                                 "newest complete one is kept for a resume)")
        if not self.acc.is_main_process:
            return None
        return ckpt.write_checkpoint(self.run_dir, self.state.step, tensors, meta, dump_config(self.cfg),
                                     self.cfg.train.keep_checkpoints)

    def _restore(self, tensors: dict, meta: dict) -> None:
        with torch.no_grad():
            for g, group in self.groups.items():
                for k, p in group.items():
                    p.copy_(tensors[f"param.{g}.{k}"])
        self.ema.load_state_dict(ckpt.unprefixed("ema", tensors), meta["ema_updates"])
        self.objective.load_extra_state(ckpt.unprefixed("objective", tensors))
        for name, opt in self.optimizers.items():
            ckpt.load_optimizer(opt, tensors, meta["optimizers"][name], prefix=f"optim.{name}")
            self.schedulers[name].load_state_dict(meta["schedulers"][name])
        rank = self.acc.process_index
        if isinstance(meta["rng"], dict):  # checkpoints written before per-process RNG states (one process)
            meta["rng"], tensors["rng.torch.0"] = [meta["rng"]], tensors["rng.torch"]
        if len(meta["rng"]) != self.acc.num_processes:
            self.log(f"checkpoint was written by {len(meta['rng'])} process(es), resuming on "
                     f"{self.acc.num_processes}: the data stream is unchanged (it is per sample); process RNG "
                     "states are taken from rank 0")
            rank = 0 if rank >= len(meta["rng"]) else rank
        py = meta["rng"][rank]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state(tuple(np.array(v, dtype=np.uint32) if i == 1 else v
                                  for i, v in enumerate(meta["rng"][rank]["numpy"])))
        torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        if torch.cuda.is_available() and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"])
        self.state = RunState(meta["step"], dict(meta["skipped"]), dict(meta["consecutive"]))

    def init_from(self, path) -> None:
        """``train.init_from``: a staged recipe's next stage (DMD2's stage 2 from stage 1, as its
        ``--ckpt_only_path``). Every trained group the checkpoint holds (student, fake score, heads) starts from its
        weights, and must fit exactly; a group it lacks (a GAN head that stage 1 did not train) starts fresh, and
        is named in the log. Optimizers, LR schedules and the step start afresh; the EMA starts at the loaded
        student. A run that has checkpoints of its own resumes from them instead."""
        tensors, _, folder = ckpt.find_checkpoint(path)
        loaded, fresh = [], []
        with torch.no_grad():
            for g, group in self.groups.items():
                keys = {f"param.{g}.{k}": p for k, p in group.items()}
                present = [k for k in keys if k in tensors]
                if not present:
                    fresh.append(g)
                    continue
                missing = sorted(set(keys) - set(present))
                extra = sorted(k for k in tensors if k.startswith(f"param.{g}.") and k not in keys)
                bad = [k for k in present if tensors[k].shape != keys[k].shape]
                if missing or extra or bad:
                    raise ckpt.ResumeError(
                        f"train.init_from {folder}: its {g!r} does not fit this run's ({len(missing)} tensors missing, "
                        f"{len(extra)} unexpected, {len(bad)} of another shape; e.g. {(missing + extra + bad)[:2]})")
                for k, p in keys.items():
                    p.copy_(tensors[k])
                loaded.append(g)
        if "student" not in loaded:
            raise ckpt.ResumeError(f"train.init_from {folder}: it holds no student weights")
        self.ema = EMA(self.groups["student"], decay=self.cfg.train.ema_decay)
        self.log(f"started {', '.join(loaded)} from {folder}" + (f"; fresh: {', '.join(fresh)}" if fresh else ""))

    # -- samples and the exported student ------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """The student holds its EMA weights inside this block, its live weights again after."""
        live = {k: p.detach().clone() for k, p in self.groups["student"].items()}
        self.ema.copy_to(self.groups["student"])
        try:
            yield self.student
        finally:
            with torch.no_grad():
                for k, p in self.groups["student"].items():
                    p.copy_(live[k])

    def evaluate_now(self, metrics) -> dict | None:
        """The EMA student under ``eval.protocol`` (main process; no collectives), logged with the losses."""
        from .eval.harness import Model, evaluate

        if not self.acc.is_main_process:
            return None
        ec = self.cfg.eval
        model = Model(f"step {self.state.step}", "checkpoint", str(self.run_dir), loaded=(self.teacher, self.student))
        with self.ema_weights():
            result, _ = evaluate(model, ec.protocol, num_images=ec.num_images, seed=self.cfg.train.seed,
                                 captions=ec.captions, images=ec.images, timing=False)
        scores = {k: float(result[k]) for k in ("fid", "clip_score", "prompt_accuracy", "diversity")
                  if result.get(k) is not None}
        metrics.write(json.dumps({"step": self.state.step, "phase": "eval", "protocol": ec.protocol, **scores}) + "\n")
        metrics.flush()
        self.acc.log({f"eval/{k}": v for k, v in scores.items()}, step=self.state.step)
        self.log(f"step {self.state.step} eval ({ec.protocol}, {ec.num_images} images): "
                 + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return result

    def export_final(self) -> Path | None:
        """The EMA student as ``RUN_DIR/final`` (diffusers folder or LoRA folder, see export.py). A recipe
        no stock scheduler reproduces is reported, not raised: the checkpoints hold the weights."""
        from .export import ExportError, export_student

        if not self.acc.is_main_process:
            return None
        try:
            with self.ema_weights():
                return export_student(self.teacher, self.student, self.run_dir / "final", config=self.cfg,
                                      step=self.state.step)
        except ExportError as e:
            self.log(f"final/ not written: {e}")
            return None

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        prompts = [f"a handwritten digit {d}" for d in range(10)] if self.cfg.data.prompts == "digits" \
            else self.prompts[:8]
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        noise = torch.randn((len(prompts), *self.teacher.latent_shape), generator=g).to(self.teacher.device)
        uncond = self.teacher.empty_cond(len(prompts)) if self.student.cfg_scale != 1.0 else None
        with self.ema_weights():
            latents = self.student.generate(noise, self.teacher.encode_prompt(prompts), uncond, generator=g)
        images = (self.teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
        return save_grid(images.cpu(), self.run_dir / "samples" / f"step-{self.state.step:06d}.png",
                         nrow=len(prompts), upscale=2)

    # -- the loop ---------------------------------------------------------------------------------
    RUN_MARKER = ".diffdistill-run"

    def claim_run_dir(self) -> None:
        """``train.output_dir`` must be a new or empty folder, or one of our runs (its marker, or -- from before the
        marker -- a checkpoint or a config.yaml with metrics.jsonl); never the project's source tree, the teacher's
        folder or a parent of either. Claimed with the marker."""
        from .config import ConfigError

        d = self.run_dir.resolve()
        protected = [Path(__file__).resolve().parent.parent]
        if Path(self.cfg.teacher.path).exists():
            protected.append(Path(self.cfg.teacher.path).resolve())
        for p in protected:
            if d == p or d in p.parents:
                raise ConfigError("train.output_dir", f"{self.run_dir} is {'' if d == p else 'a parent of '}{p}: "
                                  "choose a folder of its own for the run")
        # listed first, the marker aside: another process of this run may be writing it at this very moment
        foreign = [e for e in (d.iterdir() if d.is_dir() else []) if e.name != self.RUN_MARKER]
        ours = (d / self.RUN_MARKER).is_file() or bool(ckpt.complete_checkpoints(d)) or (
            (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file())
        if foreign and not ours:
            raise ConfigError("train.output_dir", f"{self.run_dir} is a non-empty folder that is not a diffdistill "
                              "run: choose a new or empty folder")
        if self.acc.is_main_process:
            d.mkdir(parents=True, exist_ok=True)
            (d / self.RUN_MARKER).write_text("a diffdistill training run\n")

    def fence_branch(self, folder: Path, step: int) -> None:
        """An explicit resume from an older checkpoint starts a new branch: the newer checkpoints of the abandoned
        one move, kept, to ``checkpoints/abandoned-<step>-<n>/``, so that resume=auto, export and eval follow the
        branch that ran last."""
        newer = [p for p in ckpt.complete_checkpoints(self.run_dir)
                 if int(p.name.split("-")[1]) > step and p.resolve() != folder.resolve()]
        if not newer or not self.acc.is_main_process:
            return
        n = sum(1 for _ in ckpt.checkpoints_dir(self.run_dir).glob(f"abandoned-step-{step:06d}-*"))
        aside = ckpt.checkpoints_dir(self.run_dir) / f"abandoned-step-{step:06d}-{n}"
        aside.mkdir()
        for p in newer:
            os.replace(p, aside / p.name)
        self.log(f"resuming from {folder.name}: the abandoned branch's newer checkpoints "
                 f"({', '.join(p.name for p in newer)}) moved to {aside}")

    def run(self) -> Path:
        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            removed = ckpt.clean_partial(self.run_dir)
            if removed:
                self.log(f"removed {len(removed)} incomplete checkpoint folder(s) left by an interrupted save")
        self.acc.wait_for_everyone()
        main = self.acc.is_main_process
        found = ckpt.find_resume(self.run_dir, tc.resume, log=self.log)
        if found is not None:
            tensors, meta, folder = found
            saved = folder / "config.yaml"
            notes = check_resume(saved.read_text(), self.cfg) if saved.is_file() else [
                f"{folder.name} records no config: the resume is not checked against it"]
            for note in notes:  # check_resume refused what may not change
                self.log(note)
                if main:
                    with (self.run_dir / "resume_changes.txt").open("a") as f:
                        f.write(f"{folder.name}: {note}\n")
            self._restore(tensors, meta)
            if tc.resume != "auto":  # checked and restored: only now is the older checkpoint the branch that runs
                self.fence_branch(folder, self.state.step)
            self.log(f"resumed from {folder} at step {self.state.step}")
            if main:
                trim_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        else:
            if main:  # a fresh start: records of an attempt that died before its first checkpoint are redone
                trim_metrics(self.run_dir / "metrics.jsonl", 0)
            if tc.init_from:
                self.init_from(tc.init_from)
        if main:
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            self.log(f"global batch {self.cfg.train.batch_size} x {self.acc.num_processes} process(es) x "
                     f"{self.cfg.train.gradient_accumulation} micro-step(s)")
        with self.acc.main_process_first():  # e.g. cached teacher pairs: made once, then read by the others
            self.objective.prepare(self.run_dir, self.acc.device)
        self.acc.init_trackers("diffdistill")
        metrics = (self.run_dir / "metrics.jsonl").open("a") if main else open(os.devnull, "w")
        bar = tqdm(range(self.state.step, tc.max_steps), initial=self.state.step, total=tc.max_steps,
                   desc="train", disable=not self.acc.is_local_main_process)
        with StopSignals() as stop:
            self._loop(bar, metrics, stop)
        metrics.close()
        if self.state.step == tc.max_steps:
            final = self.export_final()
            if final is not None:
                self.log(f"exported the EMA student to {final}")
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return self.run_dir

    def _stop_requested(self, stop: StopSignals) -> int | None:
        """The signal any process received (one collective on several processes, so all stop at the same step)."""
        if self.acc.num_processes == 1:
            return stop.received
        flag = torch.tensor([float(stop.received or 0)], device=self.acc.device)
        received = int(self.acc.reduce(flag, "max").item())
        return received or None

    def _loop(self, bar, metrics, stop: StopSignals) -> None:
        tc = self.cfg.train
        for step in bar:
            records = [self._update(phase, step) for phase in self.phases if step % phase.every == 0]
            if any("student" in self.phase(r["phase"]).modules and not r.get("skipped") for r in records):
                self.ema.update(self.groups["student"])  # once per student update: the decay is per update
            self.state.step = step + 1
            for r in records:
                metrics.write(json.dumps(r) + "\n")
                self.acc.log({f"{r['phase']}/{k}": v for k, v in r.items()
                              if isinstance(v, float) and math.isfinite(v)}, step=step)
            aborts = [r["abort"] for r in records if "abort" in r]
            if aborts:
                metrics.close()
                raise NonFiniteError(aborts[0])
            metrics.flush()  # every record reaches the file at its step: a kill loses none
            if step % tc.log_every == 0:
                bar.set_postfix({k: f"{v:.4g}" for r in records for k, v in r.items()
                                 if isinstance(v, float) and k not in ("lr",)})
            if self.state.step % tc.sample_every == 0 or self.state.step == tc.max_steps:
                self.save_samples()
            if self.cfg.eval.every and self.state.step % self.cfg.eval.every == 0:
                self.evaluate_now(metrics)
            saved = self.state.step % tc.checkpoint_every == 0 or self.state.step == tc.max_steps
            if saved:
                self.save_checkpoint()
            self.acc.wait_for_everyone()
            received = self._stop_requested(stop)
            if received is not None and self.state.step < tc.max_steps:
                if not saved:
                    self.save_checkpoint()
                metrics.close()
                self.acc.wait_for_everyone()
                self.log(f"signal {signal.Signals(received).name}: saved a checkpoint at step {self.state.step}; "
                         "stopping (train.resume=auto continues)")
                raise Preempted(128 + received)


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of steps at or after ``step`` (an interrupted attempt's, redone by the resume), so that
    ``metrics.jsonl`` holds one record per phase update and step after any number of resumes; atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if record.get("step", 0) < step or (record.get("phase") == "eval" and record.get("step", 0) <= step):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def record_base(step: int, phase, terms: dict, grad_norm: float, scheduler) -> dict:
    return {"step": step, "phase": phase.name, **terms, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]}


def train(config: Config) -> Path:
    """Train ``config`` to ``train.max_steps``; returns the run folder."""
    return Trainer(config).run()
