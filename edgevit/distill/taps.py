"""Read token features out of a model during its ordinary forward pass (forward hooks), so
every family (timm, Hugging Face, built-in) gives its block outputs the same way."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FeatureTap:
    """Records the outputs of the named submodules on every forward; ``remove()`` when done."""

    def __init__(self, module: nn.Module, paths: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [module.get_submodule(p).register_forward_hook(self._hook(p)) for p in dict.fromkeys(paths)]

    def _hook(self, path: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            self.outputs[path] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    def take(self, path: str) -> torch.Tensor:
        if path not in self.outputs:
            raise RuntimeError(f"no output recorded for {path}: the forward pass did not reach it")
        return self.outputs[path]

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()
