"""Training state on disk, safetensors only: tensors in one ``.safetensors`` file, everything else
(step, optimizer hyper-parameters, config) as JSON in its metadata. Writes are atomic (temporary
file, then rename), so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
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


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``tensors`` and JSON ``meta`` to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"diffdistill": json.dumps(meta)})
    os.replace(tmp, path)
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
