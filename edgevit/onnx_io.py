"""ONNX: export a graph, open an ONNX Runtime session, run it on data."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from edgevit.fileio import atomic_path
from edgevit.graph import ModelGraph
from edgevit.latency import providers

INPUT, OUTPUT = "input", "logits"


def export_onnx(graph: ModelGraph, path: Path, opset: int = 17, dynamic_batch: bool = True, batch: int = 1) -> None:
    """Export with the TorchScript-based exporter: it writes any opset down to 11, which
    TensorRT 8.2 (opset <= 13) needs; the dynamo exporter starts at opset 18."""
    import onnx

    h, w = graph.spec.img_size
    dummy = torch.zeros(batch, graph.spec.in_chans, h, w)
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
    with graph.export_mode() as module, atomic_path(Path(path)) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.cpu()
        torch.onnx.export(module, (dummy,), str(tmp), opset_version=opset, dynamo=False,
                          input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=axes,
                          do_constant_folding=True)
        onnx.checker.check_model(str(tmp), full_check=True)


def simplify_onnx(path: Path) -> dict[str, int]:
    """Fold constants and drop redundant nodes in place (ONNX Runtime's basic level, which
    rewrites only into standard ONNX ops), then check the result. Returns node counts."""
    import onnx
    import onnxruntime as ort

    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    with atomic_path(Path(path)) as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(tmp))
        used = {n.domain for n in model.graph.node}
        keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return {"nodes_before": before, "nodes_after": len(model.graph.node)}


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or torch.get_num_threads()  # the run's count (edgevit.threads)
    return ort.InferenceSession(str(path), opts, providers=providers())


def run_batches(sess: Any, images: np.ndarray) -> np.ndarray:
    """Logits for ``images``; honours a fixed batch size in the model's input shape."""
    fixed = sess.get_inputs()[0].shape[0]
    if not isinstance(fixed, int) or fixed == len(images):
        return sess.run([OUTPUT], {INPUT: images})[0]
    outs = []
    for i in range(0, len(images), fixed):
        chunk = images[i : i + fixed]
        pad = fixed - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outs.append(sess.run([OUTPUT], {INPUT: chunk})[0][: fixed - pad])
    return np.concatenate(outs)


def parity_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """How far ``got`` logits are from ``ref`` on the same images: the one spelling every
    stage reports (export vs torch, quantized vs float, engine vs ONNX Runtime)."""
    return {"max_abs_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()), "samples": len(ref)}


def predictions(sess: Any, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted classes) over the loader: top-1, or agreement between two models."""
    labels, preds = [], []
    for images, y in loader:
        preds.append(run_batches(sess, images.numpy().astype(np.float32)).argmax(-1))
        labels.append(y.numpy())
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(labels), np.concatenate(preds)


def top1(sess: Any, loader: DataLoader) -> float:
    labels, preds = predictions(sess, loader)
    return 100.0 * float((preds == labels).sum()) / max(len(labels), 1)
