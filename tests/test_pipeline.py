"""The pipeline end to end: stage dirs, report, resume after the last finished stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from edgevit.pipeline import Pipeline
from edgevit.recipe import parse_recipe
from edgevit.registry import Registry
from tests.conftest import run_cli, run_pipeline, tiny_recipe_data

STAGES = ["00-source", "01-adapt", "02-export", "03-benchmark"]



@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    tmp = tmp_path_factory.mktemp("cli")
    recipe = tmp / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(tiny_recipe_data()))
    out = tmp / "run"
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return recipe, out, res


def test_compress_writes_stages_and_report(cli_run) -> None:
    _, out, res = cli_run
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots") == STAGES
    for stage in STAGES:
        assert (out / stage / "graph.json").is_file() and (out / stage / "metrics.json").is_file()
    assert (out / "01-adapt" / "model.safetensors").is_file()
    graph = json.loads((out / "02-export" / "graph.json").read_text())
    assert graph["weights"] == "../01-adapt/model.safetensors"  # export did not copy the weights
    assert (out / "02-export" / "model.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == STAGES[:3]
    for r in rows.values():
        assert set(r) >= {"name", "top1", "params", "flops", "size_bytes", "host_latency", "throughput_ips",
                          "predicted"}
        lat = r["host_latency"]
        assert 0 < lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["spread_ms"] >= 0
        assert r["params"] > 0 and r["flops"] > 0 and r["throughput_ips"] > 0 and r["peak_mem_mb"] > 0
    assert rows["01-adapt"]["top1"] > rows["00-source"]["top1"]  # training helped
    assert abs(rows["01-adapt"]["top1"] - rows["02-export"]["top1"]) <= 1.1  # torch vs ONNX Runtime
    assert rows["02-export"]["size_bytes"] == (out / "02-export" / "model.onnx").stat().st_size
    md = (out / "report.md").read_text()
    assert "| 01-adapt |" in md
    assert "01-adapt" in res.stdout and "top-1" in res.stdout  # the CLI ends with the table


def test_rerun_skips_finished_stages(cli_run) -> None:
    recipe, out, _ = cli_run
    def stages(p: Path) -> bool:  # the report (report.*, plots/) is rebuilt on every run; stages are not
        return p.is_file() and p.parent != out and p.parent.name != "plots"

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if stages(p)}
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("reused") == 4 and "sha256" not in res.stderr
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if stages(p)}
    assert before == after


def test_changed_config_reruns_from_that_stage(cli_run) -> None:
    recipe, out, _ = cli_run
    adapt_mtime = (out / "01-adapt" / "model.safetensors").stat().st_mtime_ns
    res = run_cli("compress", str(recipe), "--out", str(out), "--set", "passes.export.opset=17")
    assert res.returncode == 0, res.stderr
    assert "00-source: unchanged" in res.stderr and "01-adapt: unchanged" in res.stderr
    assert "▶ 02-export" in res.stderr and "▶ 03-benchmark" in res.stderr
    assert (out / "01-adapt" / "model.safetensors").stat().st_mtime_ns == adapt_mtime
    assert json.loads((out / "02-export" / "metrics.json").read_text())["metrics"]["opset"] == 17


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    data = tiny_recipe_data(passes=[{"adapt": {"epochs": 3, "lr": 0.002, "warmup_epochs": 0}}])
    run_pipeline(data, tmp_path / "straight")

    import edgevit.training.loop as loop

    real_save = loop._save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[5] == 0:  # epoch index: crash right after the first epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(data, tmp_path / "crashed")
    assert (tmp_path / "crashed" / ".01-adapt.partial" / "checkpoint" / "trainer.json").is_file()
    assert not (tmp_path / "crashed" / "01-adapt").exists()
    monkeypatch.setattr(loop, "_save_checkpoint", real_save)
    _, log = run_pipeline(data, tmp_path / "crashed")
    assert "00-source: unchanged" in log and "resuming adapt after epoch 1" in log
    a = load_file(str(tmp_path / "straight" / "01-adapt" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "01-adapt" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "crashed" / ".01-adapt.partial").exists()
    m = json.loads((tmp_path / "crashed" / "01-adapt" / "metrics.json").read_text())
    assert [e["epoch"] for e in m["metrics"]["log"]] == [1, 2, 3]


def test_input_checkpoint_is_never_modified(tmp_path) -> None:
    from safetensors.torch import save_file

    from edgevit.models.simple_vit import SimpleViT

    kwargs = tiny_recipe_data()["model"]["kwargs"]
    ckpt = tmp_path / "input.safetensors"
    save_file(SimpleViT(**kwargs).state_dict(), str(ckpt))
    before = ckpt.read_bytes()
    data = tiny_recipe_data(passes=[{"adapt": {"epochs": 1}}])
    data["model"]["checkpoint"] = str(ckpt)
    run_pipeline(data, tmp_path / "run")
    assert ckpt.read_bytes() == before
    trained = load_file(str(tmp_path / "run" / "01-adapt" / "model.safetensors"))
    assert not torch.equal(trained["head.weight"], load_file(str(ckpt))["head.weight"])


def test_no_resume_reruns_everything(tmp_path) -> None:
    data = tiny_recipe_data(passes=[{"export": {"opset": 13, "parity_samples": 8}}])
    run_pipeline(data, tmp_path / "run")
    stage_files = sorted(p for d in ("00-source", "01-export") for p in (tmp_path / "run" / d).iterdir())
    assert {p.name for p in stage_files} >= {"graph.json", "metrics.json", "model.safetensors", "model.onnx"}
    before = {p: p.stat().st_mtime_ns for p in stage_files}
    recipe, steps = parse_recipe(data, tmp_path, Registry())
    buf = io.StringIO()
    Pipeline(recipe, steps, tmp_path / "run", Registry(), Console(file=buf), resume=False).run()
    for p, mtime in before.items():  # every stage file was written again, none kept
        assert p.is_file() and p.stat().st_mtime_ns > mtime, p
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["dir"] for s in manifest["stages"]] == ["00-source", "01-export"]


def test_calibration_from_the_train_split_is_not_augmented() -> None:
    from edgevit.data import build_data
    from edgevit.data.config import DigitsData
    from edgevit.graph import ModelGraph
    from tests.conftest import _builtin

    module, build = _builtin()
    spec = ModelGraph.from_module(module, build).spec
    data = build_data(DigitsData(source="digits", augment="crop_flip"), spec, 0)
    a, la = data.sample(30, 0, "train")
    b, lb = data.sample(30, 0, "train")
    assert torch.equal(a, b) and torch.equal(la, lb)  # the same images, every time
    assert not all(torch.equal(data.train[0][0], data.train[0][0]) for _ in range(5))  # training does augment


def test_embedded_demo_recipe_is_valid_and_runs_the_paper_order() -> None:
    from edgevit.recipe import load_recipe

    recipe, steps = load_recipe(None, [], Registry())
    assert [s.name for s in steps] == ["adapt", "distill", "prune", "export", "quantize", "bundle", "benchmark"]
    assert recipe.data.source == "digits" and recipe.profile == "jetson-nano"  # offline; predicted on the Nano


@pytest.mark.slow
def test_embedded_demo_runs_end_to_end(tmp_path: Path) -> None:
    res = run_cli("compress", "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    rows = {r["stage"]: r for r in json.loads((tmp_path / "demo" / "report.json").read_text())["stages"]}
    assert rows["02-distill"]["top1"] > 90 and rows["02-distill"]["flops"] < rows["01-adapt"]["flops"] / 4
    assert rows["03-prune"]["params"] < rows["02-distill"]["params"]
    for stage in ("00-source", "01-adapt", "02-distill", "03-prune", "04-export", "05-quantize"):  # on the Nano
        p = rows[stage]["predicted"]
        assert p["profile"] == "jetson-nano" and p["latency_ms"] > 0 and p["memory_mb"] > 0 and p["verdict"]
    assert rows["02-distill"]["predicted"]["latency_ms"] < rows["01-adapt"]["predicted"]["latency_ms"]


def test_a_stage_that_changes_weights_drops_the_old_onnx(tmp_path: Path) -> None:
    """export → prune: the pruned stage must not point at the unpruned ONNX (benchmark and bundle
    would measure or ship the old model under the new stage's name)."""
    from tests.conftest import run_pipeline, tiny_recipe_data

    data = tiny_recipe_data()
    data["passes"] = [{"export": {"opset": 13, "parity_samples": 8}}, {"prune": {"method": "magnitude", "mlp": 0.5}}]
    run_pipeline(data, tmp_path / "run")
    assert "onnx" in json.loads((tmp_path / "run" / "01-export" / "graph.json").read_text())["artifacts"]
    assert "onnx" not in json.loads((tmp_path / "run" / "02-prune" / "graph.json").read_text())["artifacts"]
