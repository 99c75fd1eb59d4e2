"""Training state on disk, safetensors only: tensors in one ``.safetensors`` file, everything else
(step, optimizer hyper-parameters, config) as JSON in its metadata. Writes are atomic (temporary
file, then rename), so an interrupted save never leaves a half-written checkpoint behind.

A run's checkpoint is ``<run>/checkpoints/step-NNNNNN/`` holding ``state.safetensors`` (every trainable
tensor, optimizer state, EMA, RNG; JSON metadata inside), ``config.yaml`` and, written last, the
marker ``COMPLETE``. It is assembled in ``.tmp-step-NNNNNN`` and renamed into place, so a crash
mid-save leaves the previous checkpoints untouched. Pruning runs only after the new checkpoint is
complete and only removes marker-owned ``step-*`` folders inside the run's ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus JSON-able metadata (param groups, scalar entries)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                   prefix: str = "optim") -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to disk (a rename is durable only once both are)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)
    fsync_path(path)


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically and durably write ``tensors`` and JSON ``meta`` to ``path`` (a ``.safetensors`` file, mode
    0644): written beside it, flushed to disk, renamed, and the folder flushed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"diffdistill": json.dumps(meta)})
    os.chmod(tmp, 0o644)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read what :func:`save_state` wrote; a clear error if the file is missing or not ours."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("diffdistill")
        if meta is None:
            raise ValueError(f"{path} is a safetensors file but not a diffdistill checkpoint (no metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta)


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

MARKER = "COMPLETE"
STATE_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class ResumeError(RuntimeError):
    """A requested resume cannot happen (never answered by silently training from scratch)."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Marker-owned checkpoint folders, newest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)


def write_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                     config_yaml: str, keep: int) -> Path:
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_state(tmp / STATE_FILE, tensors, meta)
    write_text_durably(tmp / "config.yaml", config_yaml)
    write_text_durably(tmp / MARKER, json.dumps({"step": step}))
    fsync_path(tmp)
    if final.exists():  # re-saving the same step (e.g. the final one): replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)  # the rename is on disk before anything older is pruned
    for old in complete_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old)
    return final


def clean_partial(run_dir: str | Path) -> list[Path]:
    """Remove ``.tmp-step-*`` leftovers of interrupted saves; returns what was removed."""
    root = checkpoints_dir(run_dir)
    removed = [p for p in root.glob(".tmp-step-*")] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p)
    return removed


def find_checkpoint(path: str | Path) -> tuple[dict, dict, Path]:
    """``(tensors, meta, folder)`` of a complete checkpoint folder, or of a run folder's newest loadable one."""
    folder = Path(path)
    if (folder / MARKER).is_file():
        return (*load_state(folder / STATE_FILE), folder)
    if not complete_checkpoints(folder):
        raise ResumeError(f"{folder} is neither a complete checkpoint (no {MARKER} marker) nor a run folder with one")
    found = find_resume(folder, "auto", log=lambda *_: None)
    assert found is not None
    return found


def find_resume(run_dir: str | Path, resume: str, log=print) -> tuple[dict, dict, Path] | None:
    """The state to resume from: ``auto`` = newest loadable complete checkpoint (corrupt ones are
    reported and skipped), ``none`` = fresh (refused if the run already has checkpoints), otherwise a
    checkpoint folder that must load."""
    if resume == "none":
        if complete_checkpoints(run_dir):
            raise ResumeError(f"{run_dir} already holds checkpoints and train.resume=none; use resume=auto "
                              "to continue, or a new train.output_dir")
        return None
    if resume != "auto":
        folder = Path(resume)
        if not (folder / MARKER).is_file():
            raise ResumeError(f"cannot resume from {folder}: not a complete checkpoint (no {MARKER} marker)")
        try:
            return (*load_state(folder / STATE_FILE), folder)
        except Exception as err:
            raise ResumeError(f"cannot resume from {folder}: {err}") from err
    candidates = complete_checkpoints(run_dir)
    for folder in candidates:
        try:
            tensors, meta = load_state(folder / STATE_FILE)
            return tensors, meta, folder
        except Exception as err:  # truncated or corrupt: report, fall back to the previous one
            log(f"warning: checkpoint {folder.name} is unreadable ({type(err).__name__}: {err}); trying an older one")
    if candidates:
        raise ResumeError(f"train.resume=auto: every checkpoint in {checkpoints_dir(run_dir)} is unreadable")
    return None
