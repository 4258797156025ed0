"""The CLI as a new user meets it: commands that answer without loading torch, tables that stay
whole in a pipe, the shared data layout, and every recipe the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

HEAVY = ("torch", "onnxruntime")
# Runs the real entry point, then reports which heavy modules the process imported.
PROBE = """
import sys
sys.argv = ["edgevit", *sys.argv[1:]]
from edgevit.cli.main import main
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=300, check=False)


def _heavy(res: subprocess.CompletedProcess) -> str:
    return next(ln for ln in res.stderr.splitlines() if ln.startswith("HEAVY=")).removeprefix("HEAVY=")


@pytest.mark.parametrize("args", [["--help"], ["profiles"], ["compress", "--bogus"], ["inspect"],
                                  ["compress", "--help"], ["data", "--help"], ["calib", "build", "--help"]])
def test_light_commands_import_neither_torch_nor_onnxruntime(args: list[str]) -> None:
    res = _probe(*args)
    assert _heavy(res) == "", f"edgevit {' '.join(args)} imported {_heavy(res)}"
    assert "Traceback" not in res.stderr
    if args[-1] in ("--bogus",) or args == ["inspect"]:
        assert res.returncode == 2 and "Error" in res.stderr  # an argument error, one clear message


def test_passes_is_light_once_listed(tmp_path: Path) -> None:
    env = dict(os.environ, EDGEVIT_CACHE=str(tmp_path))
    first = _probe("passes", env=env)  # fills the cache: this one imports the passes
    assert first.returncode == 0 and "osscar" in first.stdout
    second = _probe("passes", env=env)
    assert second.returncode == 0 and _heavy(second) == ""
    assert second.stdout == first.stdout  # the cached listing is the live one
    assert "FullConfig" not in second.stdout and "tuner (full)" in second.stdout


def test_passes_cache_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgevit.cli import passes as cli_passes

    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path))
    key = cli_passes.source_key()
    fake_pkg = tmp_path / "pkg"
    (fake_pkg / "sub").mkdir(parents=True)
    (fake_pkg / "sub" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(cli_passes, "PACKAGE", fake_pkg)
    k1 = cli_passes.source_key()
    (fake_pkg / "sub" / "a.py").write_text("x = 2\n")
    assert cli_passes.source_key() != k1 != key


def _profile_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "edgevit" / "device_profiles").glob("*.yaml"))


@pytest.mark.parametrize("columns", [None, "40"])
def test_profiles_piped_prints_every_name_whole(columns: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    res = subprocess.run(f"{sys.executable} -m edgevit.cli.main profiles | cat", shell=True, capture_output=True,
                         text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    names = _profile_names()
    assert len(names) >= 5
    cells = {c.strip() for line in res.stdout.splitlines() for c in line.split("│")}
    for name in names:
        assert name in cells, f"{name} is not a whole cell of `edgevit profiles | cat`:\n{res.stdout}"
    if columns is None:  # no width to fit: no cell is shortened or wrapped
        assert "…" not in res.stdout
        jn = next(line for line in res.stdout.splitlines() if "│ jetson-nano " in line)
        assert "TensorRT 8.2, Python 3.6" in jn


def test_profiles_show_piped_keeps_sources_whole() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = subprocess.run(f"{sys.executable} -m edgevit.cli.main profiles show jetson-nano | cat", shell=True,
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    p = yaml.safe_load((REPO / "edgevit" / "device_profiles" / "jetson-nano.yaml").read_text())
    for fact, source in p["sources"].items():
        if fact in ("name", "description", "caveats"):
            continue
        row = next((ln for ln in res.stdout.splitlines() if ln.startswith(f"│ {fact} ")), None)
        assert row is not None and source in row, f"{fact}: source cut or missing"


def test_help_has_no_type_metavars_and_whole_sentences() -> None:
    res = _probe("compress", "--help")
    assert "<bool>" not in res.stdout and "list[str]" not in res.stdout
    text = " ".join(res.stdout.split())
    assert "rank 0 alone writes the run directory" in text


# the shared data layout -----------------------------------------------------------------------

def test_unpack_checks_and_moves_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import io
    import tarfile

    from edgevit.data import shared
    from edgevit.errors import EdgeVitError

    src = tmp_path / "shared"
    src.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for rel in ("train/cat/0001.jpg", "test/cat/0001.jpg"):
            info = tarfile.TarInfo(rel)
            info.size = 3
            t.addfile(info, io.BytesIO(b"jpg"))
    (src / "cifar10-jpg-all.tar.gz").write_bytes(buf.getvalue())
    (src / "vit_cifar10_teacher.safetensors").write_bytes(b"weights")
    (src / "vit_cifar10_teacher.json").write_text("{}")
    monkeypatch.setenv("EDGEVIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgeVitError, match="sha256"):  # the published checksum does not match this fake
        shared.unpack("cifar10-jpg", src)
    assert not shared.dataset_dir("cifar10-jpg").exists()
    fake = shared.SharedDataset("cifar10-jpg", "cifar10-jpg-all.tar.gz",
                                hashlib.sha256(buf.getvalue()).hexdigest(), "", "vit_cifar10_teacher")
    monkeypatch.setitem(shared.DATASETS, "cifar10-jpg", fake)
    out = shared.unpack("cifar10-jpg", src, log=lambda m: None)
    assert out == tmp_path / "cache" / "cifar10-jpg"
    assert (out / "train" / "cat" / "0001.jpg").read_bytes() == b"jpg" and shared.is_unpacked("cifar10-jpg")
    assert shared.teacher_path("cifar10-jpg").read_bytes() == b"weights"
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []
    with pytest.raises(EdgeVitError, match="unknown shared data set 'cifar'"):
        shared.unpack("cifar", src)


# every recipe the README shows ----------------------------------------------------------------

def readme_recipes() -> list[str]:
    """The README's YAML blocks that are whole recipes (a name and a model), not fragments."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [b for b in blocks if re.search(r"^name: ", b, re.M) and re.search(r"^model:", b, re.M)]


def _need_shared_cifar() -> None:
    from edgevit.data.shared import DATASETS, is_unpacked, shared_root, unpack

    root = shared_root()
    if not is_unpacked("cifar10-jpg"):
        if root is None or not (root / DATASETS["cifar10-jpg"].archive).is_file():
            pytest.skip(f"no shared data (../shared/data or $EDGEVIT_SHARED_DATA) with "
                        f"{DATASETS['cifar10-jpg'].archive}: the README's CIFAR-10 recipes cannot run")
        unpack("cifar10-jpg", root, log=lambda m: None)


TINY = ["data.limit_train=64", "data.limit_val=64", "data.eval_batch_size=64", "calibration.num_samples=8"]


def test_readme_shows_a_recipe() -> None:
    assert readme_recipes(), "the README's quick tour lost its recipe"


@pytest.mark.parametrize("index", range(len(readme_recipes())))
def test_readme_recipe_runs_when_copied(index: int, tmp_path: Path) -> None:
    _need_shared_cifar()
    from tests.conftest import run_cli

    recipe = tmp_path / "elsewhere" / "recipe.yaml"  # pasted into a file away from the repo
    recipe.parent.mkdir()
    recipe.write_text(readme_recipes()[index])
    passes = [next(iter(p)) for p in yaml.safe_load(recipe.read_text())["passes"]]
    sets = TINY + [f"passes.{p}.epochs=1" for p in passes if p in ("adapt", "distill")]
    if "benchmark" in passes:
        sets += ["passes.benchmark.runs=3", "passes.benchmark.warmup=1", "passes.benchmark.throughput_batch=4"]
    res = run_cli("compress", str(recipe), "--out", str(tmp_path / "run"), *(a for s in sets for a in ("--set", s)),
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.slow
def test_cifar10_nano_recipe_runs(tmp_path: Path) -> None:
    _need_shared_cifar()
    from tests.conftest import run_cli

    sets = TINY + ["passes.distill.epochs=1", "passes.prune.recover.epochs=1", "passes.benchmark.runs=3",
                   "passes.bundle.validation_samples=8", "passes.quantize.eval_samples=16"]
    res = run_cli("compress", str(REPO / "recipes" / "cifar10-nano.yaml"), "--out", str(tmp_path / "run"),
                  *(a for s in sets for a in ("--set", s)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


# threads --------------------------------------------------------------------------------------

def test_thread_default_is_one_per_idle_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgevit import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    for busy, want in ((0.2, 4), (6.6, 1), (30.0, 1), (5.0, 3)):
        monkeypatch.setattr(threads, "busy_cores", lambda b=busy: (b, "busy now"))
        assert threads.choose_threads().count == want, busy  # idle: physical cores, not hyper-threads
    assert threads.choose_threads(3).count == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads().count == 2 and "OMP_NUM_THREADS" in threads.choose_threads().reason


def test_busy_cores_reads_cpu_time_not_io_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """I/O wait uses no CPU: a machine whose only 'load' is tasks waiting on disk is idle."""
    from edgevit import threads

    samples = iter([(100, 1000), (100, 1200)])  # no busy jiffies between the two reads
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.9, 0.9, 0.9))
    assert threads.busy_cores(0.0) == (0.0, "busy now")
    samples = iter([(0, 1000), (150, 1200)])  # three quarters of every CPU busy
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.busy_cores(0.0) == (3.0, "busy now")
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)
    assert threads.busy_cores(0.0) == (0.9, "load average")
    # user nice system idle iowait irq softirq steal: niced work and I/O wait leave the core to us
    assert threads.parse_cpu_line("cpu  100 900 50 400 300 5 5 0 0 0") == (160, 1760)
    assert threads.parse_cpu_line("intr 1 2 3") is None
    monkeypatch.undo()
    if Path("/proc/stat").exists():
        real = threads._cpu_times()
        assert real is not None and 0 <= real[0] <= real[1]


def test_threads_option_reaches_torch_and_onnxruntime(tmp_path: Path, write_recipe) -> None:
    from tests.conftest import run_cli, tiny_recipe_data

    recipe = write_recipe(tiny_recipe_data(passes=[{"export": {"opset": 13, "parity_samples": 16}},
                                                   {"benchmark": {"runs": 2, "warmup": 1, "throughput_batch": 2}}]))
    res = run_cli("compress", str(recipe), "--out", str(tmp_path / "run"), "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 CPU thread" in res.stderr.splitlines()[0]
    import json

    bench = json.loads((tmp_path / "run" / "02-benchmark" / "benchmark.json").read_text())
    assert bench["host"]["threads"] == 1
    assert "1 thread" in (tmp_path / "run" / "report.md").read_text()


# progress in a log ----------------------------------------------------------------------------

def test_progress_reaches_a_log_when_not_a_terminal() -> None:
    import io

    from rich.console import Console

    from edgevit.progress import LogProgress, make_progress

    buf = io.StringIO()
    with make_progress(Console(file=buf, width=80)) as progress:
        assert isinstance(progress, LogProgress)
        blocks = progress.add_task("osscar", total=6, info="")
        for i in range(6):
            progress.update(blocks, advance=1, info=f"block {i}")
        steps = progress.add_task("adapt", total=1000, info="")
        for _ in range(1000):
            progress.advance(steps)
    lines = buf.getvalue().splitlines()
    assert [ln for ln in lines if "osscar" in ln][-1].startswith("  osscar: 6/6 (100 %)")
    assert len([ln for ln in lines if "osscar" in ln]) == 6  # a line per block
    adapt = [ln for ln in lines if "adapt" in ln]
    assert 15 <= len(adapt) <= 21 and "1000/1000" in adapt[-1]  # a line per 5 %, not per step


# inspect --------------------------------------------------------------------------------------

def test_inspect_takes_a_timm_name_with_kwargs(capsys: pytest.CaptureFixture) -> None:
    from edgevit.cli.inspect import inspect

    inspect("vit_tiny_patch16_224", kwargs='{"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 7}',
            layers=False)
    out = capsys.readouterr().out
    assert "32x32 input, patch 8, embed 192, 2 blocks" in out and "7 classes" in out
    assert "attn.num_heads 3" in out and "mlp.hidden 768" in out  # the block spec's own field names


def test_inspect_takes_a_recipe_and_a_stage_dir(capsys: pytest.CaptureFixture, tmp_path: Path, write_recipe) -> None:
    from edgevit.cli.inspect import inspect
    from edgevit.graph import ModelGraph
    from tests.conftest import tiny_recipe_data

    recipe = write_recipe(tiny_recipe_data())
    inspect(str(recipe), kwargs=None, layers=True)
    out = capsys.readouterr().out
    assert "16x16 input, patch 4, embed 32, 2 blocks" in out and "per-layer cost" in out
    from edgevit.models.sources import BuiltinSource, load_model

    graph = load_model(BuiltinSource(source="builtin", kwargs={"img_size": 16, "patch_size": 4, "num_classes": 3,
                                                               "embed_dim": 32, "depth": 3, "num_heads": 2}))
    graph.keep_heads(1, [0])  # a pruned block: the table shows what differs
    graph.save(tmp_path / "stage")
    inspect(str(tmp_path / "stage"), kwargs=None, layers=False)
    out = capsys.readouterr().out
    table = out.split("blocks: the fields that differ")[1]
    assert "attn.num_heads" in table and [ln.split("│")[1:3] for ln in table.splitlines() if "│ " in ln][:3]
    assert isinstance(ModelGraph.load(tmp_path / "stage"), ModelGraph)


def test_inspect_shows_every_block_field_generically() -> None:
    """A field an adapter adds to the block spec (layer scale, q/k norm, ...) appears by itself."""
    from edgevit.cli.inspect import block_fields
    from edgevit.graph.spec import AttentionSpec, BlockSpec, MlpSpec

    class ScaledBlock(BlockSpec):
        layer_scale: float | None = None
        q_norm: str | None = None

    class Spec:
        blocks = [ScaledBlock(index=i, path=f"blocks.{i}", layer_scale=0.1 * (i + 1), q_norm=f"blocks.{i}.attn.q_norm",
                              attn=AttentionSpec(path=f"blocks.{i}.attn", qkv=f"blocks.{i}.attn.qkv",
                                                 proj=f"blocks.{i}.attn.proj", num_heads=2, head_dim=8),
                              mlp=MlpSpec(path=f"blocks.{i}.mlp", fc1=f"blocks.{i}.mlp.fc1", fc2=f"blocks.{i}.mlp.fc2",
                                          hidden=32)) for i in range(2)]

    columns, rows, same = block_fields(Spec())
    assert "layer_scale" in columns and [r["layer_scale"] for r in rows] == ["0.1", "0.2"]
    assert same["q_norm"] == "attn.q_norm" and same["attn.num_heads"] == "2"


def test_inspect_refusals_are_one_line() -> None:
    from edgevit.cli.inspect import inspect
    from edgevit.errors import EdgeVitError

    with pytest.raises(EdgeVitError, match="--kwargs is not JSON"):
        inspect("vit_tiny_patch16_224", kwargs="{img_size: 32", layers=False)
    with pytest.raises(EdgeVitError, match="neither a stage directory"):
        inspect(str(REPO / "docs"), kwargs=None, layers=False)
