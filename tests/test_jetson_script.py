"""The Jetson-side benchmark script: Python 3.6, nothing but stdlib/numpy/tensorrt/pycuda,
and the parts that need no GPU behave."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgevit.deploy.jetson import edgevit_jetson_bench as jb

SCRIPT = Path(jb.__file__)
ALLOWED = {"numpy", "tensorrt", "pycuda"}


def test_script_is_python_36_and_imports_nothing_else() -> None:
    source = SCRIPT.read_text()
    ast.parse(source, feature_version=(3, 6))  # the grammar of the board's Python
    vermin = Path(sys.executable).with_name("vermin")
    assert vermin.is_file(), "vermin is part of the dev extra: pip install -e '.[dev]'"
    res = subprocess.run([str(vermin), "-t=3.6-", "--violations", "--no-tips", str(SCRIPT)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr  # no feature newer than 3.6 (vermin)
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module != "__future__"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) <= ALLOWED, imported - set(sys.stdlib_module_names)
    assert "edgevit" not in imported and "torch" not in imported


def test_tegrastats_lines_parse() -> None:
    nano = ("RAM 1815/3964MB (lfb 106x4MB) SWAP 0/1982MB (cached 0MB) CPU [9%@1479,3%@1479,2%@1479,1%@1479] "
            "EMC_FREQ 0% GR3D_FREQ 0% PLL@22C CPU@25C PMIC@100C GPU@23.5C AO@31C thermal@24.25C "
            "POM_5V_IN 2340/2340 POM_5V_GPU 79/79 POM_5V_CPU 475/475")
    assert jb.parse_tegrastats(nano) == (1815, 2340)
    orin = "RAM 2934/7620MB (lfb 1x4MB) CPU [2%@729] VDD_IN 4587mW/4587mW VDD_CPU_GPU_CV 483mW/483mW"
    assert jb.parse_tegrastats(orin)[0] == 2934
    assert jb.parse_tegrastats("nothing here") == (None, None)


def test_statistics_and_bundle_checks(tmp_path: Path) -> None:
    p = jb.percentiles([1.0] * 98 + [5.0, 9.0])
    assert p["median"] == 1.0 and p["p90"] == 1.0 and 1.0 < p["p99"] <= 9.0
    (tmp_path / "bundle.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SystemExit, match="not an edgevit bundle"):
        jb.load_bundle(str(tmp_path))
    info = jb.device_info("8.2.1")  # off a Jetson: the board facts are simply absent
    assert info["tensorrt"] == "8.2.1" and info["python"]
