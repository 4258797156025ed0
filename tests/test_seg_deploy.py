"""Deploying a segmenter: export at its input size with a per-pixel parity gate, FP16/INT8 judged
by mIoU, a segmentation bundle, the Jetson script's numpy mIoU against edgevit's, and the
device prediction at the segmenter's input size."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from edgevit.context import RunContext
from edgevit.data import build_data
from edgevit.data.config import SegmentationData
from edgevit.deploy.jetson import edgevit_jetson_bench as jb
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.graph.adapters.segmenter import SegmenterAdapter
from edgevit.onnx_io import export_onnx, run_batches, session
from edgevit.profiles import load_profile
from edgevit.seg.deploy import compare_onnx, onnx_miou, pack_masks, val_frames
from edgevit.seg.metrics import SegMeter
from tests.conftest import labels_by_hand, miou_by_hand, randomised_graph, write_seg_pair

INPUT = (16, 24)  # the model's input size
SIZES = [(24, 32), (20, 28)]  # the files (two sizes: masks are scored, and shipped, at their own)
IGNORE = 255
CLASSES = ["dark", "bright", "other"]


def _pair(seed: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = (img[..., 0] // 86).astype(np.uint8)  # 0, 1, 2 from the red channel
    mask[0] = IGNORE
    return img, mask


def _dataset(base: Path, n_train: int = 4, n_val: int = 6) -> Path:
    for split, n, off in (("train", n_train, 0), ("val", n_val, 100)):
        for i in range(n):
            write_seg_pair(base / split, f"f{i:02d}", *_pair(off + i, SIZES[i % 2]))
    return base


def _segmenter(img_size: tuple[int, int] = INPUT, patch: int = 4, heads: int = 2, classes: int = 3,
               decoder: dict | None = None) -> ModelGraph:
    recipe = {"backbone": {"family": "timm", "architecture": "VisionTransformer",
                           "kwargs": dict(img_size=img_size, patch_size=patch, num_classes=0, global_pool="",
                                          class_token=False, embed_dim=8 * heads, depth=2, num_heads=heads,
                                          mlp_ratio=2.0)},
              "decoder": decoder or {"kind": "mla", "width": 8}, "num_classes": classes}
    torch.manual_seed(0)
    return randomised_graph(SegmenterAdapter().build(recipe), recipe)


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelGraph, object]:
    graph = _segmenter()
    root = _dataset(tmp_path_factory.mktemp("segdata"))
    cfg = SegmentationData.model_validate({"source": "segmentation", "train": root / "train", "val": root / "val",
                                           "classes": CLASSES, "ignore_index": IGNORE, "batch_size": 2})
    return graph, build_data(cfg, graph.spec, 0)


def _ctx(tmp_path: Path, data: object, stage: str, profile: str | None = "jetson-nano") -> RunContext:
    stage_dir = tmp_path / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    recipe = SimpleNamespace(calibration=SimpleNamespace(manifest=None, num_samples=4, split="train"))
    return RunContext(recipe=recipe, run_dir=tmp_path, data=data, device=torch.device("cpu"),  # type: ignore[arg-type]
                      console=Console(file=io.StringIO(), width=200), registry=None, seed=0, stage_dir=stage_dir,
                      profile=load_profile(profile) if profile else None)


def _export(graph: ModelGraph, data: object, tmp_path: Path, profile: str = "jetson-nano",
            **cfg: object) -> tuple[ModelGraph, dict]:
    from edgevit.passes.export import ExportConfig, ExportPass

    p = ExportPass(ExportConfig(parity_samples=6, **cfg))
    out = p.run(graph.clone(), _ctx(tmp_path, data, "01-export", profile))
    return out, p.metrics


def test_export_for_the_nano_at_the_input_size_with_per_pixel_parity(seg, tmp_path: Path) -> None:
    from edgevit.deploy.tensorrt_ops import standard_op_types, unsupported

    graph, data = seg
    out, m = _export(graph, data, tmp_path)
    path = out.artifacts["onnx"]
    model = onnx.load(str(path))
    assert m["opset"] == 13 and m["dynamic_batch"] is False
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, *INPUT]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 3, *INPUT]
    ops = standard_op_types(model)
    assert "Resize" in ops and "LayerNormalization" not in ops and unsupported(ops, "8.2") == []
    par = m["parity"]
    assert par["pixel_agreement"] == 1.0 and par["max_abs_diff"] < 1e-4 and par["mean_abs_diff"] < par["max_abs_diff"]
    assert par["samples"] == 6 and "top1_agreement" not in par


def _corrupt_head(path: Path) -> None:
    """Scale the classifier's weight in the ONNX: a broken export torch knows nothing about."""
    model = onnx.load(str(path))
    w = max(model.graph.initializer, key=lambda t: np.prod(t.dims) if len(t.dims) == 2 and t.dims[-1] == 3 else 0)
    arr = onnx.numpy_helper.to_array(w) * -3.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
    onnx.save(model, str(path))


def test_export_gate_fails_on_a_broken_export_in_one_line(seg, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import edgevit.passes.export as export_pass

    graph, data = seg
    real = export_pass.simplify_onnx

    def broken(path: Path) -> dict:
        out = real(path)
        _corrupt_head(path)
        return out

    monkeypatch.setattr(export_pass, "simplify_onnx", broken)
    with pytest.raises(EdgeVitError, match="pixel agreement") as e:
        _export(graph, data, tmp_path)
    assert "\n" not in str(e.value) and "differs from torch" in str(e.value)


def test_export_gate_threshold_is_configurable(seg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few flipped pixels: past the default 0.99 agreement, within a looser configured one."""
    import edgevit.passes.export as export_pass

    graph, data = seg
    real = export_pass.run_batches

    def off(sess: object, images: np.ndarray) -> np.ndarray:
        out = real(sess, images).copy()
        out[:, :, :2, :] = out[:, ::-1, :2, :]  # two rows of each frame: classes reversed
        return out

    monkeypatch.setattr(export_pass, "run_batches", off)
    with pytest.raises(EdgeVitError, match="pixel agreement"):
        _export(graph, data, tmp_path, atol=100.0)
    _, m = _export(graph, data, tmp_path / "loose", atol=100.0, min_agreement=0.5)
    assert 0.5 < m["parity"]["pixel_agreement"] < 0.99


def test_fp16_quantize_reports_miou_against_the_fp32_export(seg, tmp_path: Path) -> None:
    from edgevit.passes.quantize import QuantizeConfig, QuantizePass

    graph, data = seg
    exported, _ = _export(graph, data, tmp_path)
    fp32 = exported.artifacts["onnx"]
    p = QuantizePass(QuantizeConfig(precision="int8"))  # the Nano has no INT8: FP16 with a warning
    out = p.run(exported, _ctx(tmp_path, data, "02-quantize"))
    m = p.metrics
    assert m["precision"] == "fp16" and out.artifacts["onnx"].name == "model.fp16.onnx"
    assert {"miou", "float_miou", "miou_drop", "pixel_agreement"} <= set(m) and "quantized_top1" not in m
    assert m["eval_samples"] == 6 and m["pixel_agreement"] > 0.99 and abs(m["miou_drop"]) < 1.0
    assert m["miou_drop"] == pytest.approx(m["float_miou"] - m["miou"], abs=0.011)
    # the float mIoU is edgevit's metric on the frames, masks at their own resolution
    images, masks = val_frames(data, 500, 1)
    assert {mk.shape for mk in masks} == set(SIZES)
    meter = SegMeter(3, IGNORE)
    meter.update(torch.from_numpy(run_batches(session(fp32), images)), [torch.from_numpy(mk) for mk in masks])
    assert m["float_miou"] == pytest.approx(meter.scores().miou, abs=0.006)


def test_int8_budget_is_in_miou_points(seg, tmp_path: Path) -> None:
    from edgevit.passes.quantize import QuantizeConfig, QuantizePass

    graph, data = seg
    exported, _ = _export(graph, data, tmp_path, profile="host")
    p = QuantizePass(QuantizeConfig(precision="int8", accuracy_budget=0.0, eval_samples=10))
    p.run(exported, _ctx(tmp_path, data, "02-quantize", profile="host"))
    m = p.metrics
    assert m["precision"] == "int8" and m["miou_drop"] <= 0.0 + 1e-6 and "sensitivity" in m


def test_compare_onnx_of_a_model_with_itself_is_exact(seg, tmp_path: Path) -> None:
    graph, data = seg
    path = tmp_path / "m.onnx"
    export_onnx(graph, path, opset=13, dynamic_batch=False)
    images, masks = val_frames(data, 6, 0)
    cmp = compare_onnx(path, path, images, masks, 3, IGNORE)
    assert cmp["miou_drop"] == 0 and cmp["pixel_agreement"] == 1.0 and cmp["parity"]["max_abs_diff"] == 0
    assert cmp["miou"] == round(onnx_miou(path, images, masks, 3, IGNORE), 2)


def test_onnx_miou_is_a_hand_count_of_onnx_runtimes_labels(seg, tmp_path: Path) -> None:
    """Both ONNX entry points, quantize's frames and the benchmark's loader, give the mIoU a hand
    count of ONNX Runtime's predictions gives: logits bilinearly upsampled to each mask's own
    size, the ignore label left out."""
    from edgevit.seg.bench import onnx_scores

    graph, data = seg
    path = tmp_path / "m.onnx"
    export_onnx(graph, path, opset=13)
    images, masks = val_frames(data, 500, 1)  # every validation frame, masks of both sizes
    logits = torch.from_numpy(run_batches(session(path), images))
    pairs = [(mk, labels_by_hand(lg, mk.shape)) for lg, mk in zip(logits, masks, strict=True)]
    miou, iou = miou_by_hand(pairs, 3, IGNORE)
    assert 0 < miou < 100 and {mk.shape for mk in masks} == set(SIZES)
    assert onnx_miou(path, images, masks, 3, IGNORE) == pytest.approx(miou, abs=1e-9)
    scores = onnx_scores(session(path), data.val_loader(), data)
    assert scores["miou"] == pytest.approx(miou, abs=1e-9)
    assert list(scores["iou"].values()) == pytest.approx(iou, abs=1e-9)


def _bundle(seg, tmp_path: Path) -> Path:
    from edgevit.passes.bundle import BundleConfig, BundlePass

    graph, data = seg
    exported, _ = _export(graph, data, tmp_path)
    p = BundlePass(BundleConfig(validation_samples=5))
    return p.run(exported, _ctx(tmp_path, data, "02-bundle")).artifacts["bundle"]


def test_segmentation_bundle_carries_masks_at_their_resolution_and_the_classes(seg, tmp_path: Path) -> None:
    from edgevit.deploy.bundle import verify_bundle

    _, data = seg
    b = _bundle(seg, tmp_path)
    meta = jb.load_bundle(str(b))
    assert meta["task"] == "segmentation" and meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert meta["ignore_index"] == IGNORE and "bilinear" in meta["validation_masks"]
    assert meta["input"]["shape"] == [1, 3, *INPUT] and meta["predicted"]["verdict"] == "deployable"
    assert (b / "labels.txt").read_text().split() == CLASSES and verify_bundle(b) == []
    val = np.load(b / "val.npz")
    assert val["x"].shape == (5, 3, *INPUT) and val["x"].dtype == np.float32
    assert val["y"].dtype == np.uint8 and val["y"].shape == (5, *np.max(SIZES, 0))
    images, masks = val_frames(data, 5, 0)  # the bundle pass's frames (seed 0)
    np.testing.assert_array_equal(val["x"], images)
    assert [tuple(hw) for hw in val["mask_hw"]] == [mk.shape for mk in masks]
    for y, (h, w), mk in zip(val["y"], val["mask_hw"], masks, strict=True):
        np.testing.assert_array_equal(y[:h, :w], mk)
        assert (y[h:] == IGNORE).all() and (y[:, w:] == IGNORE).all()  # padding is ignored


def test_jetson_script_miou_equals_edgevits_on_the_same_outputs(seg, tmp_path: Path) -> None:
    """The board script's numpy metric on ONNX Runtime's outputs, from the bundle as the board reads it."""
    b = _bundle(seg, tmp_path)
    meta = jb.load_bundle(str(b))
    val = np.load(b / "val.npz", allow_pickle=False)
    sess = session(b / "model.onnx")
    outs = [run_batches(sess, val["x"][i:i + 1]) for i in range(len(val["x"]))]
    got = jb.score_segmentation(outs, val["y"], val["mask_hw"], meta["num_classes"], meta["ignore_index"])
    meter = SegMeter(3, IGNORE)
    for out, y, (h, w) in zip(outs, val["y"], val["mask_hw"], strict=True):
        meter.update(torch.from_numpy(out), [torch.from_numpy(y[:h, :w].astype(np.int64))])
    ref = meter.scores()
    assert got["miou"] == pytest.approx(ref.miou, abs=1e-6) and got["frames"] == 5
    assert got["pixel_accuracy"] == pytest.approx(ref.pixel_accuracy, abs=1e-6)
    assert [g is None for g in got["iou"]] == [r is None for r in ref.iou]
    _, data = seg
    images, masks = val_frames(data, 5, 0)
    assert got["miou"] == pytest.approx(onnx_miou(b / "model.onnx", images, masks, 3, IGNORE), abs=1e-6)


@pytest.mark.parametrize(("size", "out"), [((4, 6), (24, 32)), ((5, 7), (20, 28)), ((6, 6), (3, 4))])
def test_jetson_bilinear_upsample_is_torchs(size: tuple[int, int], out: tuple[int, int]) -> None:
    x = torch.randn(3, *size)
    ref = F.interpolate(x[None], size=out, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(jb.upsample_logits(x.numpy(), out), ref, atol=1e-5)


def test_jetson_metric_leaves_out_absent_classes_and_the_ignore_label() -> None:
    mask = np.array([[0, 0, 255], [1, 1, 255]])
    pred = np.array([[0, 1, 2], [1, 1, 0]])
    cm = jb.confusion(pred, mask, 4, 255)
    assert cm.sum() == 4 and cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 2
    miou, acc, iou = jb.seg_scores(cm)
    assert iou[2] is None and iou[3] is None and acc == 75.0
    assert miou == pytest.approx((50.0 + 200 / 3) / 2)


def test_pack_masks_keeps_wide_labels() -> None:
    y, hw = pack_masks([np.full((2, 3), 300), np.zeros((3, 2), np.int64)], 1000)
    assert y.dtype == np.int32 and y.shape == (2, 3, 3) and hw.tolist() == [[2, 3], [3, 2]] and y[1, 0, 2] == 1000


def test_nano_prediction_at_the_segmenter_input_size(tmp_path: Path) -> None:
    """A 240x320 student predicts for the 4 GB Nano (latency and the memory verdict); the same
    family at 512x512 with a finer patch needs more activation memory than the 2 GB Nano leaves."""
    from edgevit.predict.device import predict_onnx
    from edgevit.predict.kernels import kernel_graph

    small = tmp_path / "small.onnx"
    export_onnx(_segmenter((240, 320), patch=16, classes=12, decoder={"kind": "linear"}), small, opset=13,
                dynamic_batch=False)
    nano = predict_onnx(small, load_profile("jetson-nano"))
    assert nano["verdict"] == "deployable" and nano["precision"] == "fp16" and nano["latency_ms"] > 0
    assert 0 < nano["memory_mb"] < 3200 and nano["memory_breakdown_mb"]["activations"] > 0
    big = tmp_path / "big.onnx"
    export_onnx(_segmenter((512, 512), patch=8, heads=5, classes=12, decoder={"kind": "linear"}), big, opset=13,
                dynamic_batch=False)
    kg = kernel_graph(big, 4)  # read once, predicted for both boards
    nano_big = predict_onnx(big, load_profile("jetson-nano"), kg=kg)
    assert nano_big["memory_breakdown_mb"]["activations"] > 50 * nano["memory_breakdown_mb"]["activations"]
    two = predict_onnx(big, load_profile("jetson-nano-2gb"), kg=kg)
    assert two["verdict"] == "not deployable" and any("MB a process can use" in r for r in two["reasons"])
    assert predict_onnx(small, load_profile("jetson-nano-2gb"))["verdict"] == "deployable"
    assert json.dumps(nano)  # what the bundle writes into bundle.json


class _Dev:
    """A fake device buffer: pycuda's DeviceAllocation as an int address into a table."""

    def __init__(self, table: dict) -> None:
        self.data: np.ndarray | None = None
        table[id(self)] = self

    def __int__(self) -> int:
        return id(self)


def _fake_gpu(onnx_path: Path) -> dict[str, object]:
    """tensorrt and pycuda modules whose engine is ONNX Runtime: the board script's own loop runs here."""
    import types

    sess, table = session(onnx_path), {}
    out_shape = [int(d) for d in sess.get_outputs()[0].shape]

    class Context:
        def __init__(self) -> None:
            self.shape, self.addr = None, {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shape = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            return (self.shape[0], *out_shape[1:])

        def set_tensor_address(self, name: str, addr: int) -> None:
            self.addr[name] = addr

        def execute_async_v3(self, stream: int) -> bool:
            x = table[self.addr["input"]].data
            x = np.zeros(self.shape, np.float32) if x is None else x  # timing runs before any copy
            table[self.addr["logits"]].data = sess.run(None, {"input": x})[0]
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["input", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "input" else "out"

        def get_tensor_shape(self, name: str) -> tuple:
            return tuple(int(d) for d in sess.get_inputs()[0].shape)

        def create_execution_context(self) -> Context:
            return Context()

    class Event:
        def record(self, stream: object) -> None: ...

        def synchronize(self) -> None: ...

        def time_till(self, other: object) -> float:
            return 1.5

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "8.2.1.8"
    trt.Logger = type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="in")
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda blob: Engine())
    driver = types.ModuleType("pycuda.driver")
    driver.Stream = lambda: SimpleNamespace(handle=0, synchronize=lambda: None)
    driver.Event = Event
    driver.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    driver.mem_alloc = lambda nbytes: _Dev(table)
    driver.memcpy_htod_async = lambda d, h, stream: setattr(d, "data", h.copy())
    driver.memcpy_dtoh_async = lambda h, d, stream: np.copyto(h, d.data.reshape(h.shape))
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    return {"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": driver,
            "pycuda.autoinit": types.ModuleType("pycuda.autoinit")}


def test_jetson_script_writes_the_boards_miou_to_measured_json(seg, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's main loop end to end, TensorRT and CUDA faked by ONNX Runtime: measured.json
    carries the mIoU edgevit computes from the same model on the same frames."""
    b = _bundle(seg, tmp_path)
    meta = jb.load_bundle(str(b))
    for name, module in _fake_gpu(b / "model.onnx").items():
        monkeypatch.setitem(__import__("sys").modules, name, module)
    engine = b / f"model.{jb.sha256_file(str(b / 'model.onnx'))[:12]}.{meta['precision']}.trt8.2.1.8.engine"
    engine.write_bytes(b"built on the board")  # present: the script deserializes instead of building
    out = tmp_path / "measured.json"
    assert jb.main([str(b), "--out", str(out), "--runs", "3", "--warmup", "1"]) == 0
    stage = json.loads(out.read_text())["stages"][0]
    assert stage["task"] == "segmentation" and stage["top1"] is None and stage["val_frames"] == 5
    _, data = seg
    images, masks = val_frames(data, 5, 0)
    assert stage["miou"] == pytest.approx(onnx_miou(b / "model.onnx", images, masks, 3, IGNORE), abs=1e-6)
    assert stage["latency_ms"]["median"] == 1.5 and len(stage["iou"]) == 3
