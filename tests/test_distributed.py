"""Data-parallel training under torchrun: two CPU processes (gloo) on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import tiny_recipe_data


def test_torchrun_two_processes_stay_in_sync(tmp_path: Path) -> None:
    """Adapt with SliceFine, distill with feature losses, prune + recovery with LoSA."""
    data = tiny_recipe_data(passes=[
        {"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0,  # alternating slices: DDP sees unused params
                   "tuner": {"name": "slicefine", "rank": 2, "axis": "alternate", "switch_every": 3}}},
        {"distill": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0, "mgd": 1e-3,
                     "student": {"shrink": {"depth": 1, "num_heads": 1}}}},
        {"prune": {"method": "osscar", "mlp": 0.5, "recover": {"epochs": 1, "lr": 0.001, "warmup_epochs": 0,
                                                               "tuner": {"name": "losa", "rank": 4}}}},
        {"export": {"opset": 13, "parity_samples": 16}},
    ])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "edgevit.cli.main", "compress", str(recipe), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(2 processes)" in res.stderr
    assert res.stdout.count("one row per stage") == 1  # rank 0 alone reports
    for stage in ("01-adapt", "02-distill"):
        m = json.loads((out / stage / "metrics.json").read_text())["metrics"]
        assert m["world_size"] == 2 and m["ranks_in_sync"] is True, stage
        assert len(m["log"]) == 2
    recover = json.loads((out / "03-prune" / "metrics.json").read_text())["metrics"]["recover"]
    assert recover["world_size"] == 2 and recover["ranks_in_sync"] is True  # one-shot prune agreed on every rank
    assert json.loads((out / "report.json").read_text())["stages"][-1]["stage"] == "04-export"
    assert (out / "04-export" / "model.onnx").is_file()  # rank 0 alone ran the export
    assert not list(out.glob(".*partial"))
