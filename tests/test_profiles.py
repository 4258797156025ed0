"""Device profiles: schema, sources, `profiles show`, and an export that fits the Nano."""

from __future__ import annotations

import io
import json
from pathlib import Path

import onnx
import pytest
import yaml
from rich.console import Console

from edgevit.errors import EdgeVitError
from edgevit.pipeline import Pipeline
from edgevit.profiles import available, load_profile
from edgevit.recipe import parse_recipe
from edgevit.registry import Registry
from tests.conftest import run_cli, tiny_recipe_data


def test_every_profile_validates_and_every_nano_fact_has_a_source() -> None:
    assert "jetson-nano" in available()
    for name in available():
        load_profile(name)
    nano = load_profile("jetson-nano")
    facts = {k for k, v in nano.model_dump().items()
             if k not in ("name", "description", "runtime", "caveats", "sources") and v not in (None, {}, [])}
    assert facts <= set(nano.sources), facts - set(nano.sources)
    assert nano.precisions == ["fp32", "fp16"] and nano.max_opset == 13 and not nano.layernorm_op
    assert nano.peak_gflops == {"fp16": 472.0, "fp32": 236.0} and nano.memory_bandwidth_gbps == 25.6


def test_every_profile_and_measurement_file_is_package_data() -> None:
    """Read through importlib.resources (what a non-editable install has), not the checkout."""
    from importlib import resources

    from edgevit.predict.points import load_measurements

    root = resources.files("edgevit") / "device_profiles"
    names = sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))
    assert names == available() and "jetson-nano" in names
    for name in names:
        assert load_profile(name).name == name
    measured = [p.name.removesuffix(".yaml") for p in (root / "measurements").iterdir() if p.name.endswith(".yaml")]
    assert measured == ["jetson-nano"]
    assert load_measurements("jetson-nano").points


@pytest.mark.slow
def test_the_wheel_ships_the_profiles(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).parents[1]
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(root / "edgevit", src / "edgevit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src),
                          "-w", str(tmp_path)], capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgevit-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    for name in available():
        assert f"edgevit/device_profiles/{name}.yaml" in files, name
    assert "edgevit/device_profiles/measurements/jetson-nano.yaml" in files


def test_a_source_for_an_unknown_fact_is_rejected(tmp_path: Path) -> None:
    from importlib import resources

    data = yaml.safe_load((resources.files("edgevit") / "device_profiles" / "jetson-nano.yaml").read_text())
    data["sources"]["warp_drive"] = "a rumour"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgeVitError, match="warp_drive"):
        load_profile(str(path))


def test_profiles_show_prints_facts_with_sources() -> None:
    res = run_cli("profiles", "show", "jetson-nano")
    assert res.returncode == 0, res.stderr
    for text in ("472", "25.6", "5.3", "JetPack 4.6.1 release notes", "onnx-tensorrt", "no INT8 kernels"):
        assert text in res.stdout, text
    res = run_cli("profiles", "show", "jetson-nan")
    assert res.returncode == 2 and "did you mean 'jetson-nano'" in res.stderr


def test_export_for_the_nano_uses_opset_13_without_layernorm_and_keeps_parity(tmp_path: Path) -> None:
    data = tiny_recipe_data(profile="jetson-nano", passes=[
        {"adapt": {"epochs": 1, "lr": 0.003, "warmup_epochs": 0}},
        {"export": {"opset": 17, "parity_samples": 32}},
        {"quantize": {"precision": "fp16", "eval_samples": 64}},
    ])
    reg = Registry()
    recipe, steps = parse_recipe(data, tmp_path, reg)
    buf = io.StringIO()
    Pipeline(recipe, steps, tmp_path / "run", reg, Console(file=buf, width=200)).run()
    assert "jetson-nano parses ONNX up to opset 13 without LayerNormalization" in buf.getvalue()
    model = onnx.load(str(tmp_path / "run" / "02-export" / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 13
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    m = json.loads((tmp_path / "run" / "02-export" / "metrics.json").read_text())["metrics"]
    assert m["opset"] == 13 and m["parity"]["top1_agreement"] >= 0.99 and m["parity"]["max_abs_diff"] <= 1e-3
    half = onnx.load(str(tmp_path / "run" / "03-quantize" / "model.fp16.onnx"))
    casts = {o for n in half.graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute) for o in n.output}
    means = [n for n in half.graph.node if n.op_type == "ReduceMean"]
    assert means and all(n.input[0] in casts for n in means)  # the decomposed LayerNorm stays FP32
