"""Reading weights safely: safetensors, or torch files with ``weights_only=True`` (never a full
unpickle), each failure turned into one line that says what to do."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from edgevit.errors import EdgeVitError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: Path, where: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EdgeVitError(f"{where}: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EdgeVitError(
            f"{where}: cannot read {path} (truncated or not a weights file?): {reason}"
        ) from e
    except Exception as e:  # pickle.UnpicklingError and friends from weights_only loading
        # torch's message advises weights_only=False; name only what was refused
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        other = re.search(r"WeightsUnpickler error:\s*(.+?)\n\n", str(e), re.S)
        reason = (f"it needs {needs.group(1)}" if needs else " ".join(other.group(1).split()).lower() if other
                  else type(e).__name__)
        raise EdgeVitError(
            f"{where}: {path} is not a plain tensor checkpoint (refusing to unpickle arbitrary "
            f"objects): {reason}; save the state_dict as .safetensors"
        ) from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgeVitError(f"{where}: {path} does not hold a state_dict of tensors")
    return obj


def apply_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, where: str = "model.checkpoint"
) -> None:
    """Load ``state`` strictly; a mismatch names the first offending tensor and both shapes."""
    own = module.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise EdgeVitError(
                f"{where}: {source} does not fit this model: {key} has shape {list(tensor.shape)} "
                f"in the checkpoint but {list(own[key].shape)} in the model; check the model's "
                "architecture arguments"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise EdgeVitError(
            f"{where}: {source} does not fit this model: {' and '.join(parts)} tensors; check the "
            "model's architecture arguments"
        )
    module.load_state_dict(state, strict=True)
