"""The container files under docker/, checked without a Docker engine (none exists here):
pinned bases, COPY sources that exist and survive .dockerignore, shell scripts that parse,
build.sh's commands (--dry-run), and the Jetson entrypoint run against a stand-in pycuda."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
HOST = DOCKER / "host.Dockerfile"
JETSON = DOCKER / "jetson.Dockerfile"
BUILD = DOCKER / "build.sh"
ENTRYPOINT = DOCKER / "jetson-entrypoint.sh"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKERFILES = [HOST, JETSON]
_PROJECT = re.search(r"^\[project\]\n(.*?)(?=^\[)", (REPO / "pyproject.toml").read_text(), flags=re.M | re.S)
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', _PROJECT.group(1), flags=re.M).group(1)  # no tomllib on 3.10


# --- a small Dockerfile parser ---------------------------------------------------------------

@dataclass
class Instruction:
    cmd: str  # upper case: FROM, COPY, RUN, ...
    args: str  # continuation lines joined, comments inside them dropped
    line: int  # where it starts (1-based)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments and blank lines skipped, lines ending in the
    escape character (backslash) joined with the next, comment lines inside a continuation
    dropped, as Docker does. Heredocs are not supported (none are used)."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not parts:
            start = n
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        line = " ".join(p for p in parts if p)
        parts = []
        cmd, _, args = line.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    assert not parts, "the Dockerfile ends inside a line continuation"
    return out


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """``--flag=value`` options at the start of an instruction, and the rest: a JSON array
    (exec form) or shell words."""
    flags: dict[str, str] = {}
    rest = args.strip()
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        name, _, value = word[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    if rest.startswith("["):
        words = json.loads(rest)
        assert isinstance(words, list) and all(isinstance(w, str) for w in words), rest
        return flags, words
    return flags, shlex.split(rest)


def image_ref(args: str) -> tuple[dict[str, str], str, str | None]:
    """(flags, image, stage name) of a FROM line."""
    flags, words = split_flags(args)
    assert len(words) in (1, 3), f"FROM {args!r}"
    if len(words) == 3:
        assert words[1].lower() == "as", f"FROM {args!r}"
    return flags, words[0], words[2] if len(words) == 3 else None


def tag_of(image: str) -> str | None:
    """The tag of an image reference (None when it has none); the digest is left aside."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]  # a registry's :port is not a tag
    return last.split(":", 1)[1] if ":" in last else None


def instructions(path: Path) -> list[Instruction]:
    assert path.is_file(), f"{path} is missing"
    return parse_dockerfile(path.read_text())


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = ("# syntax=docker/dockerfile:1\nFROM a:1 AS b\n\nRUN x \\\n  # note\n    && y \\\n    z\n"
            'COPY ["p q", "/d/"]\n')
    ins = parse_dockerfile(text)
    assert [(i.cmd, i.args, i.line) for i in ins] == [("FROM", "a:1 AS b", 2), ("RUN", "x && y z", 4),
                                                     ("COPY", '["p q", "/d/"]', 8)]
    assert split_flags('--chown=1:1 ["p q", "/d/"]') == ({"chown": "1:1"}, ["p q", "/d/"])
    assert tag_of("python:3.12.7-slim") == "3.12.7-slim" and tag_of("localhost:5000/x") is None
    assert tag_of("nvcr.io/nvidia/l4t-base:r32.7.1@sha256:00") == "r32.7.1"
    with pytest.raises(AssertionError, match="continuation"):
        parse_dockerfile("RUN a \\\n")


# --- .dockerignore ---------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing"
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory
    excludes everything below it."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_excludes_local_state() -> None:
    rules = dockerignore_rules()
    for path in [".venv/bin/python", ".git/HEAD", "runs/demo/report.json", "data/x.npz", "model.onnx",
                 "edgevit/__pycache__/x.cpython-312.pyc", ".pytest_cache/v", ".ruff_cache/x", "sub/dir/m.onnx"]:
        assert ignored(path, rules), f".dockerignore lets {path} into the build context"
    for path in ["pyproject.toml", "constraints.txt", "README.md", "edgevit/profiles.py", "edgevit/data/__init__.py",
                 "edgevit/device_profiles/jetson-nano.yaml", "docker/jetson-entrypoint.sh"]:
        assert not ignored(path, rules), f".dockerignore drops {path}, which an image needs"


# --- the Dockerfiles -------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned_by_tag(dockerfile: Path) -> None:
    stages: set[str] = set()
    froms = [i for i in instructions(dockerfile) if i.cmd == "FROM"]
    assert froms, f"{dockerfile.name} has no FROM"
    for ins in froms:
        _, image, stage = image_ref(ins.args)
        if image not in stages:  # FROM an earlier stage needs no tag
            assert "$" not in image, f"{dockerfile.name}:{ins.line}: base image from a build arg: {image}"
            tag = tag_of(image)
            assert tag, f"{dockerfile.name}:{ins.line}: {image} has no tag"
            assert tag != "latest" and not tag.startswith("latest"), f"{dockerfile.name}:{ins.line}: {image}"
        if stage:
            stages.add(stage)


def repo_files() -> list[str]:
    """The files git tracks (or, outside a git checkout, every file but bytecode)."""
    try:
        res = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=False)
    except OSError:
        res = None
    if res is not None and res.returncode == 0 and res.stdout:
        return [f for f in res.stdout.split("\0") if f]
    return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".git" not in p.parts]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    rules = dockerignore_rules()
    tracked = repo_files()
    copies = [i for i in instructions(dockerfile) if i.cmd in ("COPY", "ADD")]
    assert copies, f"{dockerfile.name} copies nothing"
    for ins in copies:
        flags, words = split_flags(ins.args)
        if "from" in flags:
            continue  # from another stage or image, not the context
        assert len(words) >= 2, f"{dockerfile.name}:{ins.line}: {ins.cmd} {ins.args}"
        for src in words[:-1]:
            assert "://" not in src, f"{dockerfile.name}:{ins.line}: {ins.cmd} of a URL"
            assert not any(c in src for c in "*?[$"), f"{dockerfile.name}:{ins.line}: name {src} exactly"
            rel = os.path.normpath(src)
            assert not rel.startswith(".."), f"{dockerfile.name}:{ins.line}: {src} is outside the context"
            assert (REPO / rel).exists(), f"{dockerfile.name}:{ins.line}: {ins.cmd} source {src} does not exist"
            assert not ignored(rel, rules), f"{dockerfile.name}:{ins.line}: .dockerignore excludes {src}"
            if (REPO / rel).is_dir():  # what git tracks there reaches the image
                inside = [f for f in tracked if f.startswith(rel.rstrip("/") + "/")]
                assert inside, f"{dockerfile.name}:{ins.line}: git tracks nothing in {src}"
                dropped = [f for f in inside if ignored(f, rules)]
                assert not dropped, f"{dockerfile.name}:{ins.line}: .dockerignore drops {dropped[:3]}"


def test_host_image() -> None:
    ins = instructions(HOST)
    (base,) = [i for i in ins if i.cmd == "FROM"]
    flags, image, _ = image_ref(base.args)
    assert flags.get("platform") == "linux/amd64"
    assert re.fullmatch(r"python:3\.1[0-9]\.\d+-slim-\w+", image), image  # an exact patch release
    runs = " ".join(i.args for i in ins if i.cmd == "RUN")
    assert "-c constraints.txt" in runs and "pip install" in runs  # the pins scripts/setup uses
    copied = {w for i in ins if i.cmd == "COPY" for w in split_flags(i.args)[1][:-1]}
    assert {"pyproject.toml", "constraints.txt", "README.md", "edgevit/"} <= copied
    users = [i.args.split(":")[0] for i in ins if i.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), "the host image must not run as root"
    (entry,) = [i for i in ins if i.cmd == "ENTRYPOINT"]
    assert split_flags(entry.args)[1] == ["edgevit"]


def test_jetson_image() -> None:
    ins = instructions(JETSON)
    (base,) = [i for i in ins if i.cmd == "FROM"]
    flags, image, _ = image_ref(base.args)
    assert flags.get("platform") == "linux/arm64"
    assert image == "nvcr.io/nvidia/l4t-base:r32.7.1"  # JetPack 4.6.1
    sources = [w for i in ins if i.cmd in ("COPY", "ADD") for w in split_flags(i.args)[1][:-1]]
    assert sorted(sources) == ["docker/jetson-entrypoint.sh", "edgevit/deploy/jetson/edgevit_jetson_bench.py"]
    runs = " ".join(i.args for i in ins if i.cmd == "RUN")
    for pkg in ("python3-numpy", "python3-dev", "python3-pip", "build-essential"):
        assert pkg in runs, f"{pkg} is not installed"
    args = dict(i.args.partition("=")[::2] for i in ins if i.cmd == "ARG")
    assert args.get("PYCUDA_VERSION") == entrypoint_pycuda_version(), "pycuda pin differs from the entrypoint's"
    assert re.fullmatch(r"[0-9a-f]{64}", args.get("PYCUDA_SHA256", "")), "the pycuda sdist needs its sha256"
    assert "sha256sum -c" in runs
    (entry,) = [i for i in ins if i.cmd == "ENTRYPOINT"]
    assert split_flags(entry.args)[1] == ["/opt/edgevit/jetson-entrypoint.sh"]


# --- the scripts -----------------------------------------------------------------------------

def entrypoint_pycuda_version() -> str:
    pins = re.findall(r"^PYCUDA_VERSION=(\S*)", ENTRYPOINT.read_text(), flags=re.M)
    assert len(pins) == 1, f"expected one PYCUDA_VERSION= line in {ENTRYPOINT.name}, found {pins}"
    return pins[0]


def test_entrypoint_parses_and_pins_pycuda_exactly() -> None:
    for shell in ("bash", "sh"):
        res = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"{shell} -n: {res.stderr}"
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK), "the entrypoint is not executable"
    version = entrypoint_pycuda_version()
    assert re.fullmatch(r"\d+(\.\d+)+", version), f"pycuda pin {version!r} is not an exact version"
    assert (2019, 1) <= tuple(int(x) for x in version.split(".")[:2]) <= (2022, 1), \
        "pycuda after 2022.1 needs Python >= 3.8; the Jetson has 3.6"


def test_build_script_parses_and_uses_buildx_for_arm64() -> None:
    res = subprocess.run(["bash", "-n", str(BUILD)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    text = BUILD.read_text()
    assert "set -euo pipefail" in text and "buildx" in text and "--platform linux/arm64" in text
    assert not re.search(r"\beval\b", text), "no eval in build.sh"
    assert "tonistiigi/binfmt --install arm64" in text


def dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BUILD), "--dry-run", *args], capture_output=True, text=True, check=False)


def test_build_script_commands() -> None:
    res = dry_run()
    assert res.returncode == 0, res.stderr
    cmds = [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 2, res.stdout
    host, jetson = cmds
    assert host[:3] == ["docker", "buildx", "build"] and jetson[:3] == ["docker", "buildx", "build"]
    for cmd, platform, dockerfile, tag in [(host, "linux/amd64", HOST, f"edgevit/host:{VERSION}"),
                                           (jetson, "linux/arm64", JETSON, f"edgevit/jetson:{VERSION}-r32.7.1")]:
        assert cmd[cmd.index("--platform") + 1] == platform
        assert Path(cmd[cmd.index("-f") + 1]) == dockerfile
        assert cmd[cmd.index("-t") + 1] == tag
        assert "--load" in cmd and Path(cmd[-1]) == REPO  # the context is the repository root
        assert f"EDGEVIT_VERSION={VERSION}" in cmd

    only = dry_run("jetson", "--push", "--repo", "ghcr.io/me/edgevit")
    assert only.returncode == 0, only.stderr
    (line,) = [x for x in only.stdout.splitlines() if x.startswith("+ ")]
    assert "--push" in line and f"ghcr.io/me/edgevit/jetson:{VERSION}-r32.7.1" in line and "linux/amd64" not in line

    host_only = dry_run("host", "--cpu-torch")
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in host_only.stdout
    assert "linux/arm64" not in host_only.stdout

    for bad in (["nonsense"], ["--repo", "x;rm -rf /"], ["--repo", "$(id)"]):
        res = dry_run(*bad)
        assert res.returncode == 2 and "error" in res.stderr and "+ docker" not in res.stdout, bad


# --- the Jetson entrypoint, run here against stand-ins ----------------------------------------

FAKE_BENCH = "import json, sys\nprint(json.dumps(sys.argv[1:]))\n"
FAKE_TRT = "__version__ = '8.2.1.8'\n"


@pytest.fixture
def jetson_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A stand-in for /opt/edgevit (a bench that prints its arguments), python3 = this Python,
    a tensorrt module, and no CUDA."""
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    home = tmp_path / "opt"
    (home / "src").mkdir(parents=True)
    (home / "edgevit_jetson_bench.py").write_text(FAKE_BENCH)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3"  # a script, not a symlink: a venv's python must be called by its own path
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    shim.chmod(0o755)
    site = tmp_path / "site"
    site.mkdir()
    (site / "tensorrt.py").write_text(FAKE_TRT)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "EDGEVIT_HOME": str(home),
           "CUDA_HOME": str(tmp_path / "no-cuda"), "PYTHONPATH": str(site), "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return home, env


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, check=False,
                          timeout=300)


def fake_pycuda(root: Path, version: str) -> None:
    pkg = root / "pycuda"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "version.py").write_text(f"VERSION_TEXT = {version!r}\n")
    (pkg / "_driver.py").write_text("")


def test_entrypoint_without_cuda_says_to_use_the_nvidia_runtime(jetson_env: tuple[Path, dict[str, str]]) -> None:
    _, env = jetson_env
    res = run_entrypoint(env, "/bundle")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--runtime nvidia" in res.stderr and res.stdout == ""


def test_entrypoint_help_needs_no_pycuda(jetson_env: tuple[Path, dict[str, str]]) -> None:
    _, env = jetson_env
    res = run_entrypoint(env, "--help")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["--help"]


def test_entrypoint_runs_the_bench_when_pycuda_is_there(jetson_env: tuple[Path, dict[str, str]]) -> None:
    home, env = jetson_env
    version = entrypoint_pycuda_version()
    fake_pycuda(home / "pycuda" / f"pycuda-{version}", version)
    args = ["/bundle", "--out", "/bundle/measured.json", "--runs", "3"]
    res = run_entrypoint(env, *args)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == args  # passed on unchanged

    env_no_trt = dict(env, PYTHONPATH=str(home))
    res = run_entrypoint(env_no_trt, "/bundle")
    assert res.returncode == 2 and "cannot import tensorrt" in res.stderr


def test_entrypoint_builds_pycuda_once_from_the_bundled_sdist(jetson_env: tuple[Path, dict[str, str]],
                                                              tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    home, env = jetson_env
    version = entrypoint_pycuda_version()
    cuda = tmp_path / "cuda"
    (cuda / "include").mkdir(parents=True)
    (cuda / "include" / "cuda.h").write_text("")
    (cuda / "bin").mkdir()
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    env["CUDA_HOME"] = str(cuda)
    # a pure-Python stand-in sdist with pycuda's name, version and module layout
    files = {"setup.py": f"from setuptools import setup\nsetup(name='pycuda', version={version!r}, "
                         "packages=['pycuda'])\n",
             "pycuda/__init__.py": "", "pycuda/_driver.py": "", "pycuda/version.py": f"VERSION_TEXT = {version!r}\n"}
    with tarfile.open(home / "src" / f"pycuda-{version}.tar.gz", "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"pycuda-{version}/{name}")
            info.size = len(body.encode())
            tar.addfile(info, io.BytesIO(body.encode()))

    res = run_entrypoint(env, "--install-pycuda")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (home / "pycuda" / f"pycuda-{version}" / "pycuda" / "version.py").is_file()
    assert not list((home / "pycuda").glob(".build-*")), "the temporary build directory was left behind"

    (home / "src" / f"pycuda-{version}.tar.gz").unlink()  # built once: no second build is attempted
    res = run_entrypoint(env, "/bundle")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["/bundle"] and "building pycuda" not in res.stderr
