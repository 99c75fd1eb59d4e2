"""peft LoRA adapters on a diffusers denoiser: add them, switch between them without touching
``requires_grad``, and save/load one adapter in the file format ``pipe.load_lora_weights`` reads.

Why not peft's own switches: ``set_adapters(name)`` / ``disable_adapters()`` also set
``requires_grad`` on the adapter weights. In shared-base mode one network is the frozen teacher
(adapters off), the student (adapter ``student``) and the fake score (adapter ``fake_score``); when a
switch happens between a student forward and its ``backward()``, peft's switch would turn the
student's LoRA weights into non-leaves-for-autograd (``requires_grad=False``) and autograd would
silently drop their gradient. :func:`active_adapter` only flips which adapter the layers run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters attached to ``model`` (empty if none)."""
    config = getattr(model, "peft_config", None) or {}
    return list(config)


def add_lora(model: nn.Module, name: str, rank: int, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> None:
    """Attach a LoRA adapter ``name`` (rank ``rank``, ``lora_alpha`` = ``alpha`` or ``rank``) to a diffusers
    model. Earlier adapters keep their ``requires_grad`` (peft would freeze them); the new one is
    trainable; the base weights are left as they were."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    _attach(model, name, config)


def _attach(model: nn.Module, name: str, config) -> None:
    """``model.add_adapter(config, name)``, keeping earlier parameters' ``requires_grad``; the new adapter trains."""
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists on this model")
    before = {id(p): p.requires_grad for p in model.parameters()}
    model.add_adapter(config, adapter_name=name)
    for pname, p in model.named_parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])
        else:
            p.requires_grad_(f".{name}." in pname)


def lora_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """The parameters of adapter ``name``."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; this model has {adapter_names(model)}")
    for pname, p in model.named_parameters():
        if f".{name}." in pname:
            yield p


def set_active(model: nn.Module, name: str | None) -> None:
    """Run adapter ``name`` from now on (``None``: all adapters off, the base model). Gradient-safe."""
    if name is not None and name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; this model has {adapter_names(model)}")
    _set_layers(_tuner_layers(model), name)


def current(model: nn.Module) -> str | None:
    """The adapter that runs now (``None``: adapters off or none attached)."""
    return _layers_current(_tuner_layers(model))


def _set_layers(layers, name: str | None) -> None:
    for layer in layers:
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]


def _layers_current(layers) -> str | None:
    if not layers or layers[0].disable_adapters:
        return None
    active = layers[0].active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


@contextlib.contextmanager
def _layers_running(layers, name: str | None):
    """``layers`` run adapter ``name`` inside (nothing is touched when they already do); restored after."""
    previous = _layers_current(layers)
    if previous == name:
        yield
        return
    _set_layers(layers, name)
    try:
        yield
    finally:
        _set_layers(layers, previous)


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None):
    """Context in which ``model`` runs adapter ``name`` (``None``: base); restores the previous one."""
    if name is None and not adapter_names(model):
        yield model
        return
    previous = current(model)
    set_active(model, name)
    try:
        yield model
    finally:
        set_active(model, previous)


def enable_checkpointing(model: nn.Module) -> None:
    """diffusers' gradient checkpointing for ``model``, made safe for several adapters on one network.

    A checkpointed block runs its forward again during the backward; diffusers' default re-runs it with
    whatever adapter is active *then*. In shared-base mode one phase's forward and its backward are separated
    by forwards under other adapters (the fake score's, the teacher's with adapters off), and the re-run then
    saves other tensors (autograd's ``CheckpointError``) or, worse, computes another network's gradient.
    Here the re-run runs under the adapter that was active in the forward (non-reentrant checkpointing's
    ``context_fn``), read from and set on the block's own adapter layers only (no walk of the whole network per
    block). Networks without adapters behave exactly as with diffusers' default."""
    import torch.utils.checkpoint

    def checkpointed(block, *args):
        layers = _tuner_layers(block)  # the block's own adapter layers: what its re-run reads
        in_forward = _layers_current(layers)
        return torch.utils.checkpoint.checkpoint(
            block.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _layers_running(layers, in_forward)))

    model.enable_gradient_checkpointing(checkpointed)


# -- files in diffusers' LoRA format ------------------------------------------------------------------
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft LoraConfig (JSON) in the file


class LoraFileError(ValueError):
    """A LoRA weight file that diffdistill will not load: not safetensors, unreadable, or not a LoRA for us."""


# the denoiser's key prefix in a LoRA file -> the diffusers loader mixin whose save_lora_weights writes it
LORA_LOADERS = {"unet": "StableDiffusionLoraLoaderMixin", "transformer": "SD3LoraLoaderMixin"}


def save_lora(model: nn.Module, name: str, folder: str | Path, prefix: str = "unet") -> Path:
    """Write adapter ``name`` of a denoiser to ``folder/pytorch_lora_weights.safetensors`` as
    ``pipe.load_lora_weights`` reads it: peft-format keys under ``prefix`` (``unet.`` for SD / SDXL UNets,
    ``transformer.`` for SD3) and the adapter's
    ``LoraConfig`` (rank, alpha, targets) in the file's metadata, so peft rebuilds the same scale
    ``alpha / rank``. Keys stay in peft's naming on purpose: diffusers' ``convert_state_dict_to_diffusers``
    renames only attention layers, and its loader decides the naming from the first key, so a mixed
    file (convolutions + attention) would silently lose its attention LoRA on load."""
    import diffusers.loaders
    from peft.utils import get_peft_model_state_dict

    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; this model has {adapter_names(model)}")
    if prefix not in LORA_LOADERS:
        raise ValueError(f"unknown LoRA key prefix {prefix!r}; known: {sorted(LORA_LOADERS)}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    metadata = model.peft_config[name].to_dict()
    getattr(diffusers.loaders, LORA_LOADERS[prefix]).save_lora_weights(
        str(folder), **{f"{prefix}_lora_layers": tensors, f"{prefix}_lora_adapter_metadata": metadata},
        weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return Path(folder) / LORA_WEIGHT_NAME


def read_lora_file(path: str | Path, prefix: str = "unet") -> tuple[dict, dict | None]:
    """``(tensors, LoraConfig kwargs or None)`` of a diffusers-format LoRA file, keys without ``prefix``.
    Safetensors only: any other file (e.g. a pickled ``.bin``) or a corrupt one is refused, naming it."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: LoRA weights must be a .safetensors file; diffdistill never unpickles "
                            f"{path.suffix or 'extension-less'} files")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weight file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a file handle)
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise LoraFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    tensors = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    # peft's PeftModel naming, as diffusers' LCM-LoRA example scripts save it
    tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    if not any(".lora_" in k or ".lora." in k for k in tensors):
        raise LoraFileError(f"{path} holds no LoRA weights for {prefix!r} (keys '{prefix}.<module>.lora_A.weight')")
    config = None
    if _METADATA_KEY in file_meta:
        packed = json.loads(file_meta[_METADATA_KEY])
        config = {k[len(prefix) + 1:]: v for k, v in packed.items() if k.startswith(prefix + ".")} or None
    return tensors, config


def _width(layer: nn.Module, side: str) -> int | None:
    """Input (``in``) or output (``out``) width of a Linear / Conv layer, through a peft wrapper if present."""
    layer = getattr(layer, "base_layer", layer)
    for attr in (f"{side}_features", f"{side}_channels"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    return None


def _check_shapes(model: nn.Module, tensors: dict, path) -> None:
    """Every LoRA matrix in the file targets a layer of ``model`` of the right width (``lora_A``: the layer's
    input width in dim 1; ``lora_B``: its output width in dim 0). Checked before anything is attached, so a
    LoRA trained on another backbone (SD1.5 vs SDXL) fails cleanly, naming the layers."""
    layers = dict(model.named_modules())
    problems = []
    for key, w in tensors.items():
        for part, side, dim in ((".lora_A.", "in", 1), (".lora_B.", "out", 0)):
            if part not in key:
                continue
            name = key.split(part)[0]
            if name not in layers:
                problems.append(f"{name}: no such layer")
                continue
            width = _width(layers[name], side)
            if width is not None and w.ndim > dim and w.shape[dim] != width:
                problems.append(f"{name}: {side}put width {w.shape[dim]} in the file, {width} in the model")
    if problems:
        raise LoraFileError(f"{path} does not fit this model ({type(model).__name__}): {len(problems)} LoRA "
                            f"weights disagree with its layers (e.g. {problems[:3]}); was it trained on another "
                            "backbone?")


def _file_tensors(model: nn.Module, path, prefix: str) -> tuple[dict, dict | None]:
    """:func:`read_lora_file` in peft naming, shapes checked against ``model``'s layers."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    tensors, config = read_lora_file(path, prefix)
    if any(".lora." in k for k in tensors):  # older diffusers naming (lora.down / lora.up)
        tensors = convert_unet_state_dict_to_peft(tensors)
    _check_shapes(model, tensors, path)
    return tensors, config


def _set_weights(model: nn.Module, name: str, tensors: dict, path) -> None:
    """Copy ``tensors`` into adapter ``name``: every weight must land, and every layer of the adapter get one."""
    from peft.utils import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, tensors, adapter_name=name)
    except RuntimeError as err:  # torch: a size mismatch (another rank)
        raise LoraFileError(f"{path} does not fit adapter {name!r}: {err}") from err
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{name}." in k]
    if unexpected or missing:
        raise LoraFileError(f"{path} does not fit this model: {len(unexpected)} weights match no layer "
                            f"(e.g. {unexpected[:2]}), {len(missing)} adapter weights missing (e.g. {missing[:2]})")


def load_lora(model: nn.Module, name: str, path: str | Path, prefix: str = "unet") -> None:
    """Attach the LoRA in ``path`` (see :func:`save_lora`) to ``model`` as adapter ``name``. Without
    metadata, rank comes from the weights and alpha = rank (diffusers' convention). Every weight in the
    file must land in the model, and every layer of the adapter must get a weight."""
    from peft import LoraConfig

    tensors, config = _file_tensors(model, path, prefix)
    if config is None:
        ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise LoraFileError(f"{path} has no rank metadata and mixed ranks {sorted(ranks)}")
        rank = ranks.pop()
        config = {"r": rank, "lora_alpha": rank, "target_modules": sorted({k.split(".lora_")[0] for k in tensors})}
    try:
        _attach(model, name, LoraConfig(**config))
    except ValueError as err:  # peft: no layer of this model matches the file's target modules
        raise LoraFileError(f"{path} does not fit this model ({type(model).__name__}): {err}") from err
    _set_weights(model, name, tensors, path)


def fill_lora(model: nn.Module, name: str, path: str | Path, prefix: str = "unet") -> None:
    """Copy the LoRA in ``path`` into the existing adapter ``name`` of ``model``, which keeps its
    ``requires_grad``. The file must match the adapter exactly: the same rank and alpha (the scale
    ``alpha / rank``; a file without metadata counts as alpha = rank) and a weight for every adapted layer."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; this model has {adapter_names(model)}")
    own = model.peft_config[name]
    tensors, config = _file_tensors(model, path, prefix)
    ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    alpha = (config or {}).get("lora_alpha", next(iter(ranks)) if len(ranks) == 1 else None)
    if ranks != {own.r} or alpha != own.lora_alpha:
        raise LoraFileError(f"{path} is a LoRA of rank {sorted(ranks)} and alpha {alpha}; adapter {name!r} has rank "
                            f"{own.r} and alpha {own.lora_alpha}: give the run the same student.lora_rank / lora_alpha")
    _set_weights(model, name, tensors, path)
