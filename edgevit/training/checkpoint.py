"""The per-epoch training checkpoint, written and trusted only as a whole.

Weights, optimizer state and the trainer record (epoch, log, scheduler) describe one moment:
a resume that mixed files from two epochs would silently train an epoch twice. So the three
files are written into a fresh sibling directory and that directory is renamed into place
in one step; ``trainer.json`` records the sha256 of the two tensor files, and a resume
verifies them before it trusts the set. Nothing is pickled: the optimizer's tensors go to
safetensors and its scalars and parameter groups to JSON.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgevit.fileio import read_json, replace_dir, sha256_file, write_json

CHECKPOINT_FORMAT = "edgevit.checkpoint/1"
WEIGHTS, OPTIMIZER, TRAINER = "weights.safetensors", "optimizer.safetensors", "trainer.json"


@dataclass
class Checkpoint:
    """A verified checkpoint: tensors on ``device`` and the trainer record."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]


def save_checkpoint(directory: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    trainer: dict[str, Any]) -> None:
    """Write the set into ``.<name>.new`` and rename it over ``directory`` (never half a set)."""
    directory = Path(directory)
    new = directory.with_name(f".{directory.name}.new")
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    save_file(weights, str(new / WEIGHTS))
    tensors, meta = _flatten_optimizer(optimizer_state)
    save_file(tensors, str(new / OPTIMIZER))
    record = dict(trainer, format=CHECKPOINT_FORMAT, optimizer=meta,
                  sha256={WEIGHTS: sha256_file(new / WEIGHTS), OPTIMIZER: sha256_file(new / OPTIMIZER)})
    write_json(new / TRAINER, record)
    replace_dir(new, directory)


def load_checkpoint(directory: Path, device: torch.device) -> tuple[Checkpoint | None, str | None]:
    """The checkpoint under ``directory`` if its set verifies, else ``(None, why)``.

    A crash inside :func:`~edgevit.fileio.replace_dir` can leave only ``.<name>.old`` (the
    previous, complete set): it is used then."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    where = directory if (directory / TRAINER).is_file() else old if (old / TRAINER).is_file() else None
    if where is None:
        return None, None
    try:
        record = read_json(where / TRAINER)
        if record.get("format") != CHECKPOINT_FORMAT:
            return None, f"{where / TRAINER} has format {record.get('format')!r}, not {CHECKPOINT_FORMAT}"
        for name, digest in record["sha256"].items():
            if sha256_file(where / name) != digest:
                return None, f"{where / name} does not match the sha256 its trainer.json recorded"
        weights = load_file(str(where / WEIGHTS), device=str(device))
        optimizer = _unflatten_optimizer(load_file(str(where / OPTIMIZER), device=str(device)), record["optimizer"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        return None, f"{where} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return Checkpoint(weights, optimizer, record), None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state → (tensors named ``state.<param>.<key>``, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, (int, float, bool)) or value is None:
                scalars.setdefault(str(pid), {})[key] = value
            else:
                raise TypeError(f"optimizer state {pid}.{key} is a {type(value).__name__}, not a tensor or number")
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    pids = [str(pid) for pid in state["state"]]
    return tensors, {"param_groups": groups, "params_with_state": pids, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    scalars = meta["scalars"]
    state: dict[int, dict[str, Any]] = {int(pid): dict(scalars.get(pid, {})) for pid in meta["params_with_state"]}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state[int(pid)][key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
