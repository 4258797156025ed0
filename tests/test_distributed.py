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
    data = tiny_recipe_data(passes=[
        {"adapt": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0}},
        {"distill": {"epochs": 2, "lr": 0.003, "warmup_epochs": 0, "mgd": 1e-3,
                     "student": {"shrink": {"depth": 1, "num_heads": 1}}}},
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
    assert json.loads((out / "report.json").read_text())["stages"][-1]["stage"] == "02-distill"
    assert not list(out.glob(".*partial"))
