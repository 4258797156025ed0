"""A semantic segmentation model: a ViT backbone's patch tokens through a light decode head.

The backbone is any module its adapter can read patch tokens from (``tokens``: the adapter's
``patch_tokens``, so the model family stays in its adapter); the head turns the tokens of the
blocks it taps into one logit vector per patch, which is upsampled to the input. Every
operator exports at ONNX opset 13 within TensorRT 8.2's parser (MatMul, LayerNorm decomposed,
Erf, Transpose, Reshape, Resize).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.graph.spec import DecoderSpec

# (backbone, images, block indices) -> the normed patch tokens (B, N, D) after each block
TokenFn = Callable[[nn.Module, torch.Tensor, list[int]], list[torch.Tensor]]


def to_grid(per_patch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) patch logits as a (B, C, gh, gw) map, tokens in row-major patch order."""
    return per_patch.transpose(1, 2).reshape(per_patch.shape[0], -1, *grid)


class LinearDecoder(nn.Linear):
    """Segmenter's linear decoder: one ``Linear(dim, classes)`` per patch token of the last block.

    It *is* the Linear (``head.weight``, ``head.bias``), so checkpoints of the reference
    layout (``backbone.*`` + ``head.*``) load strictly and give the same logits."""

    kind = "linear"

    def __init__(self, dim: int, num_classes: int, tap: int) -> None:
        super().__init__(dim, num_classes)
        self.taps = [int(tap)]

    @property
    def num_classes(self) -> int:
        return self.out_features

    def forward(self, feats: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        return to_grid(super().forward(feats[-1]), grid)

    def spec(self, path: str) -> DecoderSpec:
        return DecoderSpec(kind="linear", path=path, taps=list(self.taps), classifier=path,
                           width=self.in_features)

    def remap_taps(self, kept: list[int]) -> None:
        self.taps = [len(kept) - 1]  # it reads the last block, whichever that is now

    def reset_classifier(self, num_classes: int) -> None:
        fresh = nn.Linear(self.in_features, num_classes).to(self.weight)
        self.weight, self.bias = fresh.weight, fresh.bias
        self.out_features = num_classes


class MultiLevelDecoder(nn.Module):
    """SETR-MLA in spirit, light: the patch tokens of several blocks, one ``Linear(dim, width)``
    each, summed (so two taps on one block merge exactly into one), then LayerNorm, GELU and a
    ``Linear(width, classes)``, all at the patch grid."""

    kind = "mla"

    def __init__(self, dim: int, num_classes: int, taps: list[int], width: int = 64) -> None:
        super().__init__()
        if not taps or sorted(set(taps)) != list(taps) or taps[0] < 0:
            raise ValueError(f"decoder taps must be distinct ascending block indices, got {taps}")
        self.taps = [int(t) for t in taps]
        self.proj = nn.ModuleList(nn.Linear(dim, width) for _ in taps)
        self.norm = nn.LayerNorm(width)
        self.act = nn.GELU()
        self.cls = nn.Linear(width, num_classes)

    @property
    def num_classes(self) -> int:
        return self.cls.out_features

    def forward(self, feats: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        y = self.proj[0](feats[0])
        for proj, f in zip(self.proj[1:], feats[1:], strict=True):
            y = y + proj(f)
        return to_grid(self.cls(self.act(self.norm(y))), grid)

    def spec(self, path: str) -> DecoderSpec:
        return DecoderSpec(kind="mla", path=path, taps=list(self.taps),
                           projections=[f"{path}.proj.{i}" for i in range(len(self.taps))],
                           norm=f"{path}.norm", classifier=f"{path}.cls", width=self.cls.in_features)

    def remap_taps(self, kept: list[int]) -> None:
        """After the backbone kept only blocks ``kept`` (old indices, ascending): a tap on a dropped
        block moves to the last kept block at or before it (else the first kept block), and taps
        that land on one block merge (their projections add)."""
        merged: dict[int, nn.Linear] = {}
        with torch.no_grad():
            for tap, proj in zip(self.taps, self.proj, strict=True):
                new = max((j for j, old in enumerate(kept) if old <= tap), default=0)
                if new in merged:
                    merged[new].weight += proj.weight
                    merged[new].bias += proj.bias
                else:
                    merged[new] = proj
        self.taps = sorted(merged)
        self.proj = nn.ModuleList(merged[t] for t in self.taps)

    def reset_classifier(self, num_classes: int) -> None:
        self.cls = nn.Linear(self.cls.in_features, num_classes).to(self.cls.weight)


Decoder = LinearDecoder | MultiLevelDecoder


def default_taps(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced blocks ending with the last (SETR-MLA's choice: 6, 12, 18, 24 of 24)."""
    n = max(1, min(n, depth))
    return sorted({depth * (k + 1) // n - 1 for k in range(n)})


class Segmenter(nn.Module):
    """``backbone`` + decode ``head``; ``forward(images)`` gives (B, classes, H, W) logits at the
    input size (bilinear, align_corners=False, as the reference CamVid teacher upsamples)."""

    def __init__(self, backbone: nn.Module, head: Decoder, patch_size: tuple[int, int], tokens: TokenFn) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.tokens = tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        logits = self.head(self.tokens(self.backbone, images, self.head.taps), grid)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
