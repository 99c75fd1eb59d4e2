"""``diffdistill plan``: what a run holds in memory, per network and per process, before any weight is downloaded.

The run is assembled exactly as the trainer assembles it (:func:`~diffdistill.assembly.assemble`), on a teacher
built at its real architecture on the meta device (``load_teacher(..., weights=False)``: a local folder's JSON
configs, or for the hub ids of the shipped recipes the configs in :mod:`diffdistill.architectures`). Nothing is
allocated; every figure is counted from the tensors the run would create:

- weights: every parameter and buffer of every network, in its dtype (the frozen teacher in ``teacher.dtype``, a
  ``force_upcast`` VAE in fp32 beside an fp16 teacher, every trained tensor as an fp32 master);
- gradients: fp32, one per trained element; AdamW: two fp32 moments per trained element (``exp_avg``,
  ``exp_avg_sq``); EMA: one fp32 shadow per element of the student's trained tensors.

Their sum is the *static* memory of one process: under DDP every process holds all of it. Gradients of every trained
group are counted at once: a bound from above on one process, where each phase's are freed after its update;
under DDP the gradient buckets hold about as much again for the phase running. Activations are not
estimated: they depend on kernels, resolution and checkpointing and are reported only where measured on a GPU
(none is on record yet), never guessed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

GB = 1e9


@dataclass
class NetworkRow:
    name: str
    params: int             # elements of its parameters
    trainable: int          # of which a phase trains
    weight_dtype: str       # the dtype most of its weights are stored in
    weight_bytes: int       # parameters and buffers
    grad_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    groups: tuple[str, ...] = ()  # the trainable groups (phase modules) whose tensors live here

    @property
    def master_dtype(self) -> str:
        return "float32" if self.trainable else "-"

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.ema_bytes


@dataclass
class Plan:
    config: object
    rows: list[NetworkRow]
    gpus: int = 1
    gpu_memory_gb: float | None = None
    alternatives: list[tuple[str, int]] = field(default_factory=list)  # (what changes, static bytes with it)

    @property
    def static_bytes(self) -> int:
        """Per process: weights, gradients, AdamW moments and EMA of every network."""
        return sum(r.total_bytes for r in self.rows)

    @property
    def trained_bytes(self) -> int:
        return sum(r.grad_bytes + r.optimizer_bytes + r.ema_bytes for r in self.rows)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def networks(teacher, objective) -> list[tuple[str, torch.nn.Module]]:
    """Every network a run holds, named: the teacher's denoiser, text encoders and VAE, then each further
    diffusers / transformers model the objective owns (a student or fake-score copy, an EMA target, a pixel
    discriminator network), named by its attribute path; what remains of the objective (heads) is one row per
    top-level attribute."""
    rows = [(f"teacher {teacher.family.denoiser[1]}", teacher.backbone.denoiser)]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(teacher, name)
        if module is not None:
            rows.append((name, module))
    rows.append(("vae", teacher.vae))
    seen = {id(m) for _, m in rows}
    for path, module in objective.named_modules():
        if id(module) not in seen and path and _is_model(module):
            seen.add(id(module))
            rows.append((path.removesuffix(".backbone.denoiser").replace(".", " "), module))
        # models held by plain helper objects (a discriminator's pixel feature network), not registered modules
        for attr, helper in vars(module).items():
            if isinstance(helper, torch.nn.Module) or not hasattr(helper, "__dict__") or helper is objective.teacher:
                continue
            for name, held in vars(helper).items():
                if _is_model(held) and id(held) not in seen:
                    seen.add(id(held))
                    rows.append((" ".join(filter(None, (path.replace(".", " "), attr, name))), held))
    return rows


def _is_model(module) -> bool:
    """A diffusers or transformers model."""
    return isinstance(module, torch.nn.Module) and hasattr(module, "config") and hasattr(module, "save_pretrained")


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def count(teacher, objective, groups: dict) -> list[NetworkRow]:
    """One :class:`NetworkRow` per network (:func:`networks`), each tensor counted once, in the first network
    that holds it; the objective's remaining tensors (heads) under their top-level attribute."""
    group_of = {id(p): g for g, group in groups.items() for p in group.values()}
    owners: list[tuple[str, list[torch.Tensor]]] = []
    counted: set[int] = set()
    for name, module in networks(teacher, objective):
        own = [t for t in _tensors(module) if id(t) not in counted]
        counted.update(id(t) for t in own)
        owners.append((name, own))
    rest: dict[str, list[torch.Tensor]] = {}
    for path, t in [*objective.named_parameters(), *objective.named_buffers()]:
        if id(t) not in counted:
            counted.add(id(t))
            rest.setdefault(path.split(".")[0], []).append(t)
    owners += list(rest.items())
    stray = [g for g, group in groups.items() for p in group.values() if id(p) not in counted]
    if stray:
        raise ValueError(f"trainable tensors outside every network of the run (groups {sorted(set(stray))})")
    rows = []
    for name, tensors in owners:
        if not tensors:
            continue
        params = [t for t in tensors if isinstance(t, torch.nn.Parameter)]
        trained = [t for t in params if id(t) in group_of]
        student = [t for t in trained if group_of[id(t)] == "student"]
        by_dtype: dict[torch.dtype, int] = {}
        for t in params or tensors:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel()
        n_trained = sum(t.numel() for t in trained)
        rows.append(NetworkRow(
            name=name, params=sum(t.numel() for t in params), trainable=n_trained,
            weight_dtype=_dtype_name(max(by_dtype, key=by_dtype.get)),
            weight_bytes=sum(t.numel() * t.element_size() for t in tensors),
            grad_bytes=4 * n_trained, optimizer_bytes=8 * n_trained, ema_bytes=4 * sum(t.numel() for t in student),
            groups=tuple(sorted({group_of[id(t)] for t in trained}))))
    return rows


def assemble_on_meta(config):
    """``(teacher, assembly)`` of ``config`` at real architecture on the meta device. ``student.init`` is not
    read (it holds weights; the student's architecture is the config's)."""
    from .assembly import assemble
    from .pipeline import load_teacher
    from .sources import load_prompts
    from .trainer import DTYPES

    tc = config.teacher
    prompts = load_prompts(config.data.prompts, config.data.caption_column)
    teacher = load_teacher(tc.path, dtype=DTYPES[tc.dtype], resolution=tc.resolution, vae=tc.vae, weights=False)
    torch.manual_seed(config.train.seed)
    from accelerate import init_empty_weights

    with init_empty_weights():  # the parameters the objective creates (heads) are counted, never allocated
        return teacher, assemble(config, teacher, prompts, dataclasses.replace(config.student, init=None))


def plan(config, gpus: int = 1, gpu_memory_gb: float | None = None, alternatives: bool = True) -> Plan:
    """The memory plan of ``config`` (a loaded :class:`~diffdistill.config.Config`); with ``alternatives``, the
    static memory of the same run with each option that lowers it and this config does not use yet."""
    teacher, run = assemble_on_meta(config)
    result = Plan(config, count(teacher, run.objective, run.groups), gpus, gpu_memory_gb)
    if alternatives:
        result.alternatives = _alternatives(config, result)
    return result


def _alternatives(config, base: Plan) -> list[tuple[str, int]]:
    """Options that lower the static memory, each with the static bytes it gives (counted by re-planning, or, for
    an optimizer state, by its element size)."""
    out = []
    fake = getattr(config.objective, "fake_score", None)
    if fake == "full" and any(r.name == "fake" for r in base.rows):
        lighter = dataclasses.replace(config, objective=dataclasses.replace(config.objective, fake_score="lora"))
        what = "objective.fake_score=lora (an adapter on the shared base instead of a full copy; not the paper's network)"
        out.append((what, plan(lighter, alternatives=False).static_bytes))
    if config.teacher.dtype == "float32":
        half = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, dtype="bfloat16"))
        what = "teacher.dtype=bfloat16 (the frozen networks in bf16; trained tensors stay fp32 masters)"
        out.append((what, plan(half, alternatives=False).static_bytes))
    adam = sum(r.optimizer_bytes for r in base.rows)
    out.append(("8-bit AdamW (2 bytes of state per trained element instead of 8; not available yet)",
                base.static_bytes - adam + adam // 4))
    if base.gpus > 1:
        trained = sum(r.weight_bytes for r in base.rows if r.trainable) + base.trained_bytes
        what = f"sharding the trained tensors and their states over {base.gpus} GPUs (FSDP2 / ZeRO-3; not available yet)"
        out.append((what, base.static_bytes - trained + trained // base.gpus))
    return out


def format_plan(p: Plan) -> str:
    """The plan as a table and a per-process summary."""
    cfg = p.config
    head = (f"{cfg.objective.name} on {cfg.teacher.path} ({cfg.teacher.dtype} teacher, {cfg.student.kind} student, "
            f"batch {cfg.train.batch_size} per process, gradient checkpointing "
            f"{'on' if cfg.train.gradient_checkpointing else 'off'})")
    cols = ("network", "params", "trainable", "weights", "masters", "weights GB", "grads GB", "AdamW GB", "EMA GB",
            "total GB")
    lines = [[r.name + (f" [{', '.join(r.groups)}]" if r.groups else ""), f"{r.params / 1e6:,.1f}M",
              f"{r.trainable / 1e6:,.1f}M", r.weight_dtype, r.master_dtype, *(f"{b / GB:.2f}" for b in (
                  r.weight_bytes, r.grad_bytes, r.optimizer_bytes, r.ema_bytes, r.total_bytes))] for r in p.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [head, "", fmt.format(*cols), *(fmt.format(*row) for row in lines), ""]
    static = p.static_bytes / GB
    out.append(f"static per process: {static:.2f} GB (every process of a DDP run holds all of it; gradients of all "
               "phases counted at once); activations: not measured (no GPU measurement on record)")
    if p.gpu_memory_gb is not None:
        verdict = "fits" if static < p.gpu_memory_gb else "does NOT fit"
        out.append(f"against {p.gpu_memory_gb:g} GB per GPU: the static part {verdict} "
                   f"({p.gpu_memory_gb - static:+.2f} GB left for activations)")
    if p.alternatives:
        out.append("options that lower it:")
        out += [f"  {what}: static {b / GB:.2f} GB" for what, b in p.alternatives]
    if not cfg.train.gradient_checkpointing:
        out.append("  train.gradient_checkpointing=true lowers activations only (not counted here)")
    return "\n".join(out)
