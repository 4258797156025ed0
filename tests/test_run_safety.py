"""Runs that survive crashes, races and tampering (issue 19).

Each test reproduces one way a run used to go wrong: a process killed between the checkpoint
files, two runs on one directory, a stage file changed after it finished, a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli, tiny_recipe_data


def run_hooked(hook: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, after ``hook`` (Python source) ran there: the hook patches
    a library function to simulate a crash or a full disk at a chosen point."""
    script = textwrap.dedent(hook) + textwrap.dedent(f"""
        import sys
        sys.argv = ["edgevit", *{list(args)!r}]
        from edgevit.cli.main import main
        main()
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


ADAPT_ONLY = {"passes": [{"adapt": {"epochs": 3, "lr": 0.002, "warmup_epochs": 0}}]}


# 1. a kill between the checkpoint files ---------------------------------------------------------
KILL_AFTER_SECOND_WEIGHTS = """
    import os
    import safetensors.torch as st
    import torch
    _real_save_file, _real_save, _weights = st.save_file, torch.save, []
    def _kill_if_second_epoch():  # epoch 2's weights are written, its optimizer state and record not yet
        if len(_weights) == 2:
            os._exit(9)
    def save_file(tensors, filename, metadata=None):
        if "optimizer" in str(filename):
            _kill_if_second_epoch()
        _real_save_file(tensors, filename, metadata=metadata)
        if "weights.safetensors" in str(filename):  # the training checkpoint's weights
            _weights.append(filename)
    def save(obj, f, *args, **kwargs):  # a checkpoint format with a torch-pickled optimizer state
        if "optimizer" in str(f):
            _kill_if_second_epoch()
        _real_save(obj, f, *args, **kwargs)
    st.save_file, torch.save = save_file, save
"""


def test_kill_between_checkpoint_files_resumes_to_identical_weights(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_data(**ADAPT_ONLY))
    straight = run_cli("compress", str(recipe), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = run_hooked(KILL_AFTER_SECOND_WEIGHTS, "compress", str(recipe), "--out", str(tmp_path / "crashed"))
    assert killed.returncode == 9, killed.stderr
    assert not (tmp_path / "crashed" / "01-adapt").exists()
    resumed = run_cli("compress", str(recipe), "--out", str(tmp_path / "crashed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming adapt after epoch 1 of 3" in resumed.stderr  # epoch 2 was not committed
    assert tensors_equal(tmp_path / "straight" / "01-adapt" / "model.safetensors",
                         tmp_path / "crashed" / "01-adapt" / "model.safetensors")
    log = json.loads((tmp_path / "crashed" / "01-adapt" / "metrics.json").read_text())["metrics"]["log"]
    assert [e["epoch"] for e in log] == [1, 2, 3]


def test_a_damaged_checkpoint_is_not_trusted(tmp_path: Path) -> None:
    """Bytes changed in a committed checkpoint: the resume notices (sha256) and starts the stage over."""
    from edgevit.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "checkpoint"
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    save_checkpoint(ckpt, {"model.w": torch.ones(4)}, opt.state_dict(), {"epoch": 0, "log": [], "seconds": 0.0,
                                                                         "scheduler": {}})
    found, problem = load_checkpoint(ckpt, torch.device("cpu"))
    assert found is not None and problem is None and torch.equal(found.weights["model.w"], torch.ones(4))
    raw = bytearray((ckpt / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (ckpt / "weights.safetensors").write_bytes(bytes(raw))
    found, problem = load_checkpoint(ckpt, torch.device("cpu"))
    assert found is None and "sha256" in problem and "weights.safetensors" in problem


# 2. two runs on one directory -------------------------------------------------------------------
HOLD_THE_LOCK = """
    import pathlib, time
    import edgevit.rundir as rundir
    _enter = rundir.RunLock.__enter__
    def _hold(self):  # take the lock, say so, then wait until the test lets the run go on
        out = _enter(self)
        (self.path.parent.parent / "locked").write_text("yes")
        for _ in range(1200):
            if (self.path.parent.parent / "go").exists():
                break
            time.sleep(0.1)
        return out
    rundir.RunLock.__enter__ = _hold
"""

QUICK = {"passes": [{"adapt": {"epochs": 1}}, {"export": {"opset": 13, "parity_samples": 8}}]}


def test_two_runs_on_one_directory(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_data(**QUICK))
    work = tmp_path / "w"
    work.mkdir()
    out = work / "run"
    script = textwrap.dedent(HOLD_THE_LOCK) + textwrap.dedent(f"""
        import sys
        sys.argv = ["edgevit", "compress", {str(recipe)!r}, "--out", {str(out)!r}]
        from edgevit.cli.main import main
        main()
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        for _ in range(1200):
            if (work / "locked").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (work / "locked").exists(), first.communicate()[1]
        second = run_cli("compress", str(recipe), "--out", str(out))
    finally:
        (work / "go").write_text("go")
        _, first_err = first.communicate(timeout=600)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
    assert f"pid {first.pid}" in lines[0] and "in use by another edgevit run" in lines[0]
    assert first.returncode == 0, first_err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["dir"] for s in manifest["stages"]] == ["00-source", "01-adapt", "02-export"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots") == \
        ["00-source", "01-adapt", "02-export"]  # nothing half-written or deleted by the second run
    assert (out / "02-export" / "model.onnx").is_file() and not (out / ".lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "then"}))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_data(passes=[]))
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"took over the lock of a run that is gone (pid {dead.pid}" in res.stderr
    assert not (out / ".lock").exists()


def test_lock_refuses_while_held_in_process(tmp_path: Path) -> None:
    from edgevit.errors import EdgeVitError
    from edgevit.rundir import RunLock

    with RunLock(tmp_path), pytest.raises(EdgeVitError, match=f"pid {os.getpid()}"), RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # released: free again
        pass


# 3./4./6./10. a finished run on the Nano profile, then tampering and bad re-runs ----------------
NANO = {"profile": "jetson-nano",
        "passes": [{"adapt": {"epochs": 1}}, {"export": {"parity_samples": 8}}, {"quantize": {"precision": "fp16",
                   "eval_samples": 16}}, {"bundle": {"validation_samples": 8}}]}


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("nano")
    recipe = write_recipe(base / "r.yaml", tiny_recipe_data(**NANO))
    res = run_cli("compress", str(recipe), "--out", str(base / "run"))
    assert res.returncode == 0, res.stderr
    return recipe, base / "run"


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines == errors, res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def test_strict_int8_on_the_nano_fails_before_anything_is_deleted(nano_run: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    recipe, run = nano_run
    out = copy_run(run, tmp_path / "run")
    before = snapshot(out)
    res = run_cli("compress", str(recipe), "--out", str(out), "--set", "passes.quantize.precision=int8",
                  "--set", "passes.quantize.strict=true")
    one_error_line(res, "passes[2].quantize.precision", "jetson-nano", "int8")
    assert snapshot(out) == before  # 03-quantize and 04-bundle are still there, the manifest unchanged
    rep = run_cli("report", str(out))
    assert rep.returncode == 0, rep.stderr


def test_strict_int8_fails_before_training(tmp_path: Path) -> None:
    data = tiny_recipe_data(**NANO)
    data["passes"][2]["quantize"] = {"precision": "int8", "strict": True}
    recipe = write_recipe(tmp_path / "r.yaml", data)
    res = run_cli("compress", str(recipe), "--out", str(tmp_path / "run"))
    one_error_line(res, "passes[2].quantize.precision")
    assert not (tmp_path / "run").exists()  # not a single stage ran


@pytest.mark.parametrize("target", ["01-adapt/model.safetensors", "02-export/model.onnx"])
def test_tampered_stage_file_is_detected(nano_run: tuple[Path, Path], tmp_path: Path, target: str) -> None:
    recipe, run = nano_run
    out = copy_run(run, tmp_path / "run")
    tampered = os.urandom((out / target).stat().st_size)
    (out / target).write_bytes(tampered)
    stage = target.split("/")[0]
    strict = run_cli("compress", str(recipe), "--out", str(out), "--no-rerun")
    one_error_line(strict, str(out / target), "sha256")
    rep = run_cli("report", str(out))  # the report is built, and says which file no longer matches
    assert rep.returncode == 0 and f"{out / target} changed since its stage finished (sha256 mismatch)" in \
        " ".join(rep.stderr.split()), rep.stderr
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"{stage}: {target.split('/')[1]} changed since the stage finished (sha256 mismatch); " \
           f"re-running from {stage}" in res.stderr
    assert f"▶ {stage}" in res.stderr and "04-bundle: unchanged" not in res.stderr
    assert (out / target).read_bytes() != tampered  # rewritten by the re-run
    again = run_cli("compress", str(recipe), "--out", str(out))
    assert again.returncode == 0 and again.stderr.count("reused") == 5, again.stderr
    assert tensors_equal(run / "01-adapt" / "model.safetensors", out / "01-adapt" / "model.safetensors")


def test_manifest_and_report_agree_after_a_shorter_recipe(nano_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A re-run that drops stages: the manifest forgets them first, their directories go, report works."""
    _, run = nano_run
    out = copy_run(run, tmp_path / "run")
    data = tiny_recipe_data(**NANO)
    data["passes"] = data["passes"][:2]
    recipe = write_recipe(tmp_path / "r.yaml", data)
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [s["dir"] for s in manifest["stages"]] == dirs == ["00-source", "01-adapt", "02-export"]
    assert run_cli("report", str(out)).returncode == 0


def test_users_recipe_is_never_written(nano_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = nano_run
    out = copy_run(run, tmp_path / "run")
    assert (out / "recipe.effective.yaml").is_file() and not (out / "recipe.yaml").exists()
    mine = out / "recipe.effective.yaml"
    res = run_cli("compress", str(mine), "--out", str(out))
    one_error_line(res, "write over the recipe")


# 7. signals -----------------------------------------------------------------------------------
BLOCK_IN_TRAINING = """
    import pathlib, time
    import edgevit.training.loop as loop
    def _epoch(*args, **kwargs):  # signal the test, then train "forever"
        pathlib.Path(__import__("os").environ["EDGEVIT_TEST_MARK"]).write_text("training")
        time.sleep(600)
    loop._train_epoch = _epoch
"""


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_says_where_the_run_stopped(tmp_path: Path, sig: int, code: int, name: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_data(**QUICK))
    out, mark = tmp_path / "run", tmp_path / "mark"
    script = textwrap.dedent(BLOCK_IN_TRAINING) + textwrap.dedent(f"""
        import sys
        sys.argv = ["edgevit", "compress", {str(recipe)!r}, "--out", {str(out)!r}]
        from edgevit.cli.main import main
        main()
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONPATH=str(REPO), EDGEVIT_TEST_MARK=str(mark))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for _ in range(1200):
        if mark.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last == (f"interrupted ({name}) during 01-adapt; finished stage 00-source is kept; run the same command "
                    "again to resume (a training stage continues after its last finished epoch)"), err
    assert not (out / ".lock").exists()
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0 and "00-source: unchanged" in res.stderr, res.stderr


# 10. the bundle is readable by other users ----------------------------------------------------
def test_bundle_and_stage_files_are_readable_by_others(nano_run: tuple[Path, Path]) -> None:
    _, run = nano_run
    bundle = run / "04-bundle" / "bundle"
    assert bundle.is_dir()
    assert (bundle.stat().st_mode & 0o777) == 0o755
    for p in bundle.rglob("*"):
        want = 0o755 if p.is_dir() or p.name.endswith(".py") else 0o644
        assert (p.stat().st_mode & 0o777) == want, (p, oct(p.stat().st_mode))
    assert (run / "01-adapt" / "model.safetensors").stat().st_mode & 0o777 == 0o644
