"""The deploy bundle: everything the board needs to build and measure the model, and nothing
that needs edgevit there.

Layout (``bundle.json`` is the index; the Jetson script's docstring fixes its format)::

    bundle.json   format, stage, model, precision (the engine's), workspace_mb, input, validation,
                  preprocess (img_size, mean, std, resize), labels, profile, predicted, and the
                  caller's ``meta`` (the bundle pass: onnx_precision, engine_precision, batch)
    model.onnx    the stage's ONNX (the board builds its own engine from it)
    val.npz       x: float32 N,C,H,W normalised like the model's input; y: labels. A segmentation
                  bundle (``task: segmentation``, ``classes``, ``num_classes``, ``ignore_index``):
                  y: the masks at their own resolution, padded with the ignore label to one
                  N,Hmax,Wmax array, and mask_hw: each mask's (h, w), so the board scores mIoU
                  where the host does (not at the input size, which would change the number)
    labels.txt    one class name per line, in logit order
    calibration/  the calibration manifest and range cache, when the run has them
    edgevit_jetson_bench.py, README.txt
    SHA256SUMS    ``sha256sum -c SHA256SUMS`` checks the copy on the board
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.deploy.jetson import edgevit_jetson_bench as jetson
from edgevit.fileio import current_umask, replace_dir, write_json, write_text
from edgevit.fileio import sha256_file as sha256

SCRIPT = Path(jetson.__file__)
BUNDLE_FORMAT = jetson.FORMAT_IN


def write_bundle(out: Path, *, onnx_path: Path, stage: str, precision: str, workspace_mb: int,
                 input_name: str, input_shape: list[int], val_x: np.ndarray, val_y: np.ndarray,
                 labels: list[str], preprocess: dict[str, Any], profile: str | None,
                 predicted: dict[str, Any] | None, extra_files: dict[str, Path] | None = None,
                 meta: dict[str, Any] | None = None, val_extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write the bundle into a temporary sibling and move it into place whole. ``val_extra``: more
    arrays for val.npz (a segmentation bundle's ``mask_hw``); masks (``val_y`` of 2+ dims) keep
    their dtype (uint8 for most label sets), labels become int64."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = current_umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: another user on the board must read the bundle
    try:
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        y = val_y if val_y.ndim > 1 else val_y.astype(np.int64)
        np.savez_compressed(tmp / "val.npz", x=val_x.astype(np.float32), y=y, **(val_extra or {}))
        write_text(tmp / "labels.txt", "\n".join(labels) + "\n")
        shutil.copyfile(SCRIPT, tmp / SCRIPT.name)
        os.chmod(tmp / SCRIPT.name, 0o777 & ~umask)  # runnable as ./edgevit_jetson_bench.py
        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        index = {"format": BUNDLE_FORMAT, "stage": stage, "model": "model.onnx", "precision": precision,
                "workspace_mb": workspace_mb, "input": {"name": input_name, "shape": input_shape},
                "validation": "val.npz", "labels": "labels.txt", "preprocess": preprocess, "profile": profile,
                "predicted": predicted, "files": sorted(["model.onnx", "val.npz", "labels.txt", SCRIPT.name,
                                                         *(extra_files or {})]), **(meta or {})}
        write_json(tmp / "bundle.json", index)
        write_text(tmp / "README.txt", _readme(stage, precision, profile))
        sums = [f"{sha256(p)}  {p.relative_to(tmp).as_posix()}" for p in sorted(tmp.rglob("*"))
                if p.is_file() and p.name != "SHA256SUMS"]
        write_text(tmp / "SHA256SUMS", "\n".join(sums) + "\n")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def verify_bundle(directory: Path) -> list[str]:
    """Files whose sha256 differs from SHA256SUMS (empty: the bundle is intact)."""
    bad = []
    for line in (Path(directory) / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = Path(directory) / name
        if not path.is_file() or sha256(path) != digest:
            bad.append(name)
    return bad


def _readme(stage: str, precision: str, profile: str | None) -> str:
    return f"""edgevit deploy bundle: stage {stage}, {precision}{f', for {profile}' if profile else ''}

On the board (JetPack 4.6: Python 3.6, TensorRT 8.2, pycuda):
    sha256sum -c SHA256SUMS
    python3 {SCRIPT.name} . --out measured.json
It builds the TensorRT engine from model.onnx on the board (engines are not portable), times
batch-1 inference with CUDA events, scores val.npz (top-1, or mIoU for a segmenter) and
samples tegrastats. Bring measured.json
back and run:
    edgevit report RUN_DIR --measured measured.json
"""
