"""Export for the Nano, the deploy bundle, predictions in the report, and a device result
brought back with ``edgevit report --measured``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgevit.deploy.bundle import verify_bundle
from edgevit.deploy.jetson import edgevit_jetson_bench as jb
from edgevit.onnx_io import run_batches, session
from tests.conftest import run_cli, run_pipeline, tiny_recipe_data


def _nano_recipe(**bundle) -> dict:
    data = tiny_recipe_data(profile="jetson-nano")
    data["passes"] = [{"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
                      {"export": {"parity_samples": 16}},
                      {"bundle": {"validation_samples": 24, **bundle}},
                      {"benchmark": {"runs": 3, "warmup": 1, "throughput_batch": 4}}]
    return data


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("nano") / "run"
    report, log = run_pipeline(_nano_recipe(), out)
    return out, report, log


def test_nano_export_has_no_layernorm_opset_13_static_batch_and_parity(nano_run) -> None:
    out, _, _ = nano_run
    model = onnx.load(str(out / "02-export" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" not in ops and {"ReduceMean", "Sqrt"} <= ops
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 13
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]
    m = json.loads((out / "02-export" / "metrics.json").read_text())["metrics"]
    assert m["opset"] == 13 and m["dynamic_batch"] is False
    assert m["simplified"]["nodes_after"] < m["simplified"]["nodes_before"]
    assert m["parity"]["max_abs_diff"] < 1e-3 and m["parity"]["top1_agreement"] == 1.0


def test_bundle_is_complete_checksummed_and_readable_by_the_board_script(nano_run) -> None:
    out, _, log = nano_run
    b = out / "03-bundle" / "bundle"
    meta = jb.load_bundle(str(b))  # what the Jetson script itself accepts
    assert meta["stage"] == "02-export" and meta["precision"] == "fp16" and meta["profile"] == "jetson-nano"
    assert meta["input"] == {"name": "input", "shape": [1, 3, 16, 16]} and meta["workspace_mb"] == 256
    assert meta["preprocess"]["img_size"] == [16, 16] and len(meta["preprocess"]["mean"]) == 3
    assert meta["predicted"]["verdict"] == "deployable"
    assert meta["onnx_precision"] == "fp32" and meta["engine_precision"] == "fp16"  # FP32 file, FP16 engine
    assert meta["batch"]["size"] == 1 and "one at a time" in meta["batch"]["note"]
    for name in ("model.onnx", "val.npz", "labels.txt", "edgevit_jetson_bench.py", "README.txt", "SHA256SUMS"):
        assert (b / name).is_file(), name
    assert (b / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    assert verify_bundle(b) == []
    val = np.load(b / "val.npz")
    assert val["x"].shape == (24, 3, 16, 16) and val["x"].dtype == np.float32 and val["y"].shape == (24,)
    # the shipped images are the validation images prepared exactly as on the host
    from edgevit.data import build_data
    from edgevit.graph import ModelGraph
    from edgevit.recipe import parse_recipe
    from edgevit.registry import Registry

    recipe, _ = parse_recipe(_nano_recipe(), out.parent, Registry())
    spec = ModelGraph.load(out / "02-export").spec
    x, y = build_data(recipe.data, spec, 0).sample(24, 0, "val")
    np.testing.assert_array_equal(val["x"], x.numpy())
    np.testing.assert_array_equal(val["y"], y.numpy())
    assert run_batches(session(b / "model.onnx"), val["x"]).shape == (24, 10)
    labels = (b / "labels.txt").read_text()
    (b / "labels.txt").write_text("tampered\n")
    assert verify_bundle(b) == ["labels.txt"]
    (b / "labels.txt").write_text(labels)  # the run is shared with the tests below
    assert verify_bundle(b) == []
    assert "bundle 03-bundle/bundle from 02-export" in log


def test_bundle_records_the_resize_the_data_pipeline_does(nano_run) -> None:
    """A client scoring images of another size must resize like edgevit did: the bundle's
    recorded method, applied by hand, gives what edgevit's own data pipeline gives."""
    import torch
    import torch.nn.functional as F

    from edgevit.data.task_data import _transform
    from edgevit.graph import ModelGraph

    out, _, _ = nano_run
    pre = json.loads((out / "03-bundle" / "bundle" / "bundle.json").read_text())["preprocess"]
    r = pre["resize"]
    assert r["interpolation"] == "bilinear" and r["antialias"] is True and r["crop"] is None
    spec = ModelGraph.load(out / "02-export").spec
    img = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8)  # not the model's size, not square
    ours = _transform(spec, "none", train=False)(img)
    h, w = pre["img_size"]
    by_hand = F.interpolate(img[None].float() / 255, size=(h, w), mode=r["interpolation"], antialias=r["antialias"],
                            align_corners=False)[0]
    mean, std = torch.tensor(pre["mean"])[:, None, None], torch.tensor(pre["std"])[:, None, None]
    assert torch.allclose(ours, (by_hand - mean) / std, atol=0.05)  # uint8 rounding inside Resize only


def test_report_predicts_every_stage_on_the_nano(nano_run) -> None:
    out, report, log = nano_run
    stages = {s["stage"]: s for s in report["stages"]}
    for name in ("00-source", "01-adapt", "02-export"):
        p = stages[name]["predicted"]
        assert p["profile"] == "jetson-nano" and p["precision"] == "fp16" and p["verdict"] == "deployable"
        assert p["latency_ms"] > 0 and p["memory_mb"] > 0 and "families" in p["fit"]
        lo, hi = p["latency_interval_ms"]
        assert lo < p["latency_ms"] < hi
    md = (out / "report.md").read_text()
    assert "## Predicted on jetson-nano" in md and "| 02-export | fp16 |" in md
    assert "interval ms" in md and f"{lo:.2f}–{hi:.2f}" in md  # the last stage's interval
    assert f"({lo:.2f}–{hi:.2f})" in (out / "report.html").read_text()
    assert "jetson-nano fp16:" in log and "predicted" in log


def test_report_sets_device_measurements_beside_the_prediction(nano_run, tmp_path: Path) -> None:
    out, report, _ = nano_run
    pred = next(s for s in report["stages"] if s["stage"] == "02-export")["predicted"]["latency_ms"]
    measured = {"format": "edgevit.measured/1",
                "device": {"model": "NVIDIA Jetson Nano Developer Kit", "l4t": "R32.7.1", "tensorrt": "8.2.1.8",
                           "power_mode": "MAXN", "python": "3.6.9"},
                "stages": [{"stage": "02-export", "precision": "fp16", "top1": 91.5,
                            "latency_ms": {"median": pred * 2, "p90": pred * 2.1, "p99": pred * 2.5},
                            "throughput_ips": 300.0, "peak_mem_mb": 1650.0, "power_mw": 4100}]}
    f = tmp_path / "measured.json"
    f.write_text(json.dumps(measured))
    res = run_cli("report", str(out), "--measured", str(f))
    assert res.returncode == 0, res.stderr
    assert "predicted on jetson-nano" in res.stdout and "-50.0" in res.stdout  # predicted half the measured
    rep = json.loads((out / "report.json").read_text())
    entry = next(s for s in rep["stages"] if s["stage"] == "02-export")
    assert entry["measured_on_device"][0]["top1"] == 91.5 and rep["devices"][0]["l4t"] == "R32.7.1"
    assert "device ms (p50)" in (out / "report.md").read_text()
    assert run_cli("report", str(out)).returncode == 0  # kept: a plain rebuild still has it
    assert "measured_on_device" in json.loads((out / "report.json").read_text())["stages"][2]


def test_report_rejects_what_is_not_a_device_result(nano_run, tmp_path: Path) -> None:
    out, _, _ = nano_run
    f = tmp_path / "other.json"
    f.write_text(json.dumps({"format": "something/2"}))
    res = run_cli("report", str(out), "--measured", str(f))
    assert res.returncode == 2 and "is not a device measurement" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("report", str(tmp_path))
    assert res.returncode == 2 and "not a run directory" in res.stderr


def test_bundle_refuses_int8_on_the_nano_in_one_line(tmp_path: Path, write_recipe) -> None:
    res = run_cli("compress", str(write_recipe(_nano_recipe(precision="int8"))), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "jetson-nano has no int8 kernels" in res.stderr and "use precision: fp16" in res.stderr


def test_engine_build_needs_tensorrt_and_says_so(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; the gpu test covers the build")
    except ImportError:
        pass
    from edgevit.deploy.tensorrt_engine import build_engine
    from edgevit.errors import EdgeVitError

    with pytest.raises(EdgeVitError, match="tensorrt is not installed"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(nano_run, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    pytest.importorskip("pycuda", reason="pycuda is not installed on this machine")
    from edgevit.deploy.tensorrt_engine import build_engine, parity

    out, _, _ = nano_run
    onnx_path = out / "02-export" / "model.onnx"
    engine = build_engine(onnx_path, tmp_path / "m.engine", "fp16", 256, timing_cache=tmp_path / "timing.cache")
    x = np.load(out / "03-bundle" / "bundle" / "val.npz")["x"]
    p = parity(engine, onnx_path, x)
    assert p["top1_agreement"] >= 0.95 and p["max_abs_diff"] < 0.1
    assert (tmp_path / "timing.cache").stat().st_size > 0


def test_bundle_refuses_int8_without_qdq_nodes(tmp_path: Path) -> None:
    from edgevit.errors import EdgeVitError

    data = _nano_recipe(precision="int8")
    data["profile"] = "host"  # INT8 is supported here, but the float ONNX has no Q/DQ to build it from
    with pytest.raises(EdgeVitError, match="needs a model with Q/DQ nodes"):
        run_pipeline(data, tmp_path / "run")
