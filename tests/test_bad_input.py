"""Bad input: one ``error:`` line naming the problem, exit code 2, no traceback, nothing lost.

Every case runs the real CLI (``python -m edgevit.cli.main``) in a subprocess, except where a
condition cannot be produced for real here (an unreadable directory when running as root).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from edgevit.errors import EdgeVitError
from edgevit.registry import Registry
from tests.conftest import run_cli, tiny_recipe_data

TINY_KWARGS = tiny_recipe_data()["model"]["kwargs"]


# helpers ------------------------------------------------------------------------------------
def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and stderr is exactly one ``error:`` line containing every needle
    (input is checked before anything else is printed or written)."""
    err = res.stderr
    assert res.returncode == 2, f"exit code {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line:\n{err}"
    assert lines == errors, f"unexpected lines on stderr:\n{err}"
    line = errors[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_run_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Like :func:`assert_user_error` for a failure after stages started: progress lines may come
    first, the error is the one ``error:`` line and the last line."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, f"exit {res.returncode}\n{res.stderr}"
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], res.stderr
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def compress(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("compress", str(recipe), "--out", str(out), *extra)


def quick_recipe(**overrides: Any) -> dict[str, Any]:
    """The tiny recipe with a single adapt pass: a bad input fails before anything trains."""
    return tiny_recipe_data(**{"passes": [{"adapt": {"epochs": 1}}], **overrides})


def builtin_model(**overrides: Any) -> dict[str, Any]:
    return {"source": "builtin", "kwargs": dict(TINY_KWARGS, **overrides)}


def save_builtin_checkpoint(path: Path, **kwargs: Any) -> Path:
    from edgevit.models.simple_vit import SimpleViT

    save_file(SimpleViT(**dict(TINY_KWARGS, **kwargs)).state_dict(), str(path))
    return path


def write_png(path: Path, mode: str = "RGB", size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color: Any = 128 if mode == "L" else (200, 30, 60)
    Image.new(mode, (size, size), color).save(path)


def image_folder(root: Path, mode: str = "RGB", classes: tuple[str, ...] = ("a", "b"),
                 per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                write_png(root / split / c / f"{i}.png", mode)
    return root


def imagefolder_data(root: Path, **extra: Any) -> dict[str, Any]:
    return {"source": "imagefolder", "train": str(root / "train"), "val": str(root / "val"),
            "batch_size": 4, **extra}


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(directory.rglob("*"))
    }


# model: checkpoints ---------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(
        model=dict(builtin_model(), checkpoint="/nonexistent.safetensors")))
    res = compress(recipe, tmp_path / "run")
    assert_user_error(res, "model.checkpoint", "not found", "/nonexistent.safetensors")
    assert not (tmp_path / "run").exists(), "a failed run must not create its run dir"


def test_truncated_checkpoint(tmp_path: Path) -> None:
    ckpt = save_builtin_checkpoint(tmp_path / "w.safetensors")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(model=dict(builtin_model(), checkpoint=str(ckpt))))
    res = compress(recipe, tmp_path / "run")
    assert_user_error(res, "model.checkpoint", str(ckpt), "truncated")
    assert not (tmp_path / "run").exists()


def test_checkpoint_with_wrong_shapes(tmp_path: Path) -> None:
    from edgevit.models.simple_vit import SimpleViT

    ckpt = save_builtin_checkpoint(tmp_path / "w48.safetensors", embed_dim=48)
    theirs = SimpleViT(**dict(TINY_KWARGS, embed_dim=48)).state_dict()
    ours = SimpleViT(**TINY_KWARGS).state_dict()
    # apply_state_dict reports the first mismatching tensor in the checkpoint's order; safetensors
    # stores tensors sorted by name, so compute it the same way instead of hard-coding it
    from safetensors.torch import load_file

    first = next(k for k in load_file(str(ckpt)) if theirs[k].shape != ours[k].shape)
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(model=dict(builtin_model(), checkpoint=str(ckpt))))
    res = compress(recipe, tmp_path / "run")
    assert_user_error(res, "model.checkpoint", first, str(list(theirs[first].shape)),
                      str(list(ours[first].shape)))


# model: not a ViT / offline pretrained ----------------------------------------------------------
def test_non_vit_model(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(model={"source": "timm", "name": "resnet18"}))
    res = compress(recipe, tmp_path / "run")
    line = assert_user_error(res, "model", "ResNet", "not a supported Vision Transformer")
    assert "timm" in line  # it says what is supported


def test_pretrained_while_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an empty cache, so nothing downloaded earlier on this machine can satisfy the request
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(
        model={"source": "timm", "name": "deit_tiny_patch16_224", "pretrained": True}))
    res = compress(recipe, tmp_path / "run")
    assert_user_error(res, "model.pretrained", "deit_tiny_patch16_224", "model.checkpoint")
    assert not (tmp_path / "run").exists()


# recipe: passes and keys --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "suggestion"), [("adpat", "adapt"), ("exprot", "export"),
                                                  ("benchmrak", "benchmark"), ("zzzz", None)])
def test_unknown_pass(tmp_path: Path, name: str, suggestion: str | None) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(passes=[{name: {}}]))
    res = compress(recipe, tmp_path / "run")
    line = assert_user_error(res, "passes[0]", f"unknown pass '{name}'",
                             "available: " + ", ".join(Registry().names("passes")))
    if suggestion:
        assert f"did you mean '{suggestion}'" in line
    else:
        assert "did you mean" not in line


@pytest.mark.parametrize(("mutate", "needles"), [
    (lambda d: d.update(sed=1), ("recipe.sed", "unknown key", "did you mean 'seed'")),
    (lambda d: d["passes"][0]["adapt"].update(epoch=3),
     ("passes[0].adapt.epoch", "unknown key", "did you mean 'epochs'")),
    (lambda d: d["data"].update(batchsize=8), ("recipe.data.batchsize", "unknown key")),
    (lambda d: d["model"].update(checkpiont="x.safetensors"), ("recipe.model.checkpiont", "unknown key")),
], ids=["top-level", "pass-config", "data", "model"])
def test_unknown_recipe_key(tmp_path: Path, mutate: Any, needles: tuple[str, ...]) -> None:
    data = quick_recipe()
    mutate(data)
    recipe = write_yaml(tmp_path / "r.yaml", data)
    assert_user_error(compress(recipe, tmp_path / "run"), *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item", ["passes.adapt.epochs", "=3", "epochs"])
def test_bad_set_syntax(tmp_path: Path, item: str) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe())
    res = compress(recipe, tmp_path / "run", "--set", item)
    assert_user_error(res, "--set", repr(item), "expected KEY=VALUE")
    assert not (tmp_path / "run").exists()


# data ---------------------------------------------------------------------------------------------
def test_empty_train_dir(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    train = root / "train"
    for p in sorted(train.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
    res = compress(recipe, tmp_path / "run")
    assert_user_error(res, "data.train", "no class folders", str(train))
    assert not (tmp_path / "run").exists()


def test_class_folders_without_images(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    for p in (root / "train").rglob("*.png"):
        p.unlink()
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
    assert_user_error(compress(recipe, tmp_path / "run"), "data.train", "no images found")


@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_nonexistent_data_dir(tmp_path: Path, kind: str) -> None:
    root = image_folder(tmp_path / "imgs")
    bad = tmp_path / "nope" if kind == "missing" else tmp_path / "r.yaml"  # the recipe: a file
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=dict(imagefolder_data(root), train=str(bad))))
    assert_user_error(compress(recipe, tmp_path / "run"), "data.train", "directory not found", str(bad))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a chmod 000 directory anyway")
def test_unreadable_data_dir(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    (root / "train").chmod(0)
    try:
        recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
        assert_user_error(compress(recipe, tmp_path / "run"), "data.train", str(root / "train"))
    finally:
        (root / "train").chmod(0o755)


def test_unreadable_data_dir_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The same as test_unreadable_data_dir, in-process, with the denial simulated (works as root)."""
    import pathlib

    from edgevit.cli import main as cli_main

    root = image_folder(tmp_path / "imgs")
    locked = root / "train"
    real_iterdir, real_scandir = pathlib.Path.iterdir, os.scandir

    def iterdir(self: Path):  # noqa: ANN202
        if Path(self) == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def scandir(path: Any = "."):  # noqa: ANN202
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    monkeypatch.setattr(os, "scandir", scandir)
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
    monkeypatch.setattr(sys, "argv", ["edgevit", "compress", str(recipe), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        cli_main.main()
    res = subprocess.CompletedProcess([], exc.value.code, "", capsys.readouterr().err)
    assert_user_error(res, "data.train", str(locked))


def test_single_channel_images(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "gray", mode="L")
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
    res = compress(recipe, tmp_path / "run")
    assert_user_error(res, "data.train", "is a L image", "not 3-channel RGB", "data.to_rgb: true")
    assert not (tmp_path / "run").exists()


def test_single_channel_images_accepted_with_to_rgb(tmp_path: Path) -> None:
    from edgevit.data import build_data
    from edgevit.data.config import ImageFolderData
    from edgevit.models.sources import BuiltinSource, load_model

    root = image_folder(tmp_path / "gray", mode="L")
    graph = load_model(BuiltinSource(source="builtin", kwargs=TINY_KWARGS))
    cfg = ImageFolderData.model_validate(imagefolder_data(root, to_rgb=True))
    bundle = build_data(cfg, graph.spec, seed=0)
    assert bundle.num_classes == 2 and len(bundle.train) == 6 and len(bundle.val) == 6
    x, y = next(iter(bundle.val_loader()))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        assert graph.module(x).shape == (6, 10)
    # without to_rgb the same folder is refused, in-process too
    with pytest.raises(EdgeVitError, match="to_rgb"):
        build_data(ImageFolderData.model_validate(imagefolder_data(root)), graph.spec, seed=0)


# nothing already written is lost ----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One successful run of the tiny recipe (~15 s), shared by the tests below."""
    base = tmp_path_factory.mktemp("finished")
    recipe = write_yaml(base / "recipe.yaml", tiny_recipe_data())
    out = base / "run"
    res = compress(recipe, out)
    assert res.returncode == 0, res.stderr
    snap = snapshot(out)
    assert "manifest.json" in snap and "00-source/metrics.json" in snap and "report.json" in snap
    return out, snap


def _bad_missing_checkpoint(d: dict[str, Any], tmp: Path) -> list[str]:
    d["model"]["checkpoint"] = "/nonexistent.safetensors"
    return []


def _bad_unknown_key(d: dict[str, Any], tmp: Path) -> list[str]:
    d["sed"] = 1
    return []


def _bad_pass_key(d: dict[str, Any], tmp: Path) -> list[str]:
    d["passes"][0]["adapt"]["epoch"] = 1
    return []


def _bad_unknown_pass(d: dict[str, Any], tmp: Path) -> list[str]:
    d["passes"].append({"adpat": {}})
    return []


def _bad_shapes(d: dict[str, Any], tmp: Path) -> list[str]:
    d["model"]["checkpoint"] = str(save_builtin_checkpoint(tmp / "w48.safetensors", embed_dim=48))
    return []


def _bad_data(d: dict[str, Any], tmp: Path) -> list[str]:
    d["data"] = imagefolder_data(image_folder(tmp / "gray", mode="L"))
    return []


def _bad_set(d: dict[str, Any], tmp: Path) -> list[str]:
    return ["--set", "passes.adapt.epochs"]


@pytest.mark.parametrize("bad", [_bad_missing_checkpoint, _bad_unknown_key, _bad_pass_key,
                                 _bad_unknown_pass, _bad_shapes, _bad_data, _bad_set],
                         ids=lambda f: f.__name__.removeprefix("_bad_"))
def test_bad_input_keeps_finished_run(finished_run: tuple[Path, dict[str, str]], tmp_path: Path,
                                      bad: Any) -> None:
    out, before = finished_run
    data = tiny_recipe_data()
    extra = bad(data, tmp_path)
    recipe = write_yaml(tmp_path / "bad.yaml", data)
    assert_user_error(compress(recipe, out, *extra))
    assert snapshot(out) == before


# issue 19: every input that used to end in a traceback -------------------------------------------
@pytest.mark.parametrize(("item", "needles"), [
    ("name=[1, 2", ("--set name", "not plain YAML")),
    ("seed=!!python/object/apply:os.system ['echo pwned']", ("--set seed", "not plain YAML")),
    ("passes=3", ("recipe.passes", "valid list")),
    ("seed=-1", ("recipe.seed", "greater than or equal to 0")),
], ids=["yaml-syntax", "python-tag", "passes-not-a-list", "negative-seed"])
def test_bad_set_values(tmp_path: Path, item: str, needles: tuple[str, ...]) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe())
    res = compress(recipe, tmp_path / "run", "--set", item)
    assert_user_error(res, *needles)
    assert "pwned" not in res.stdout + res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save"])
def test_pickled_checkpoint_is_one_line_without_torchs_warning(tmp_path: Path, kind: str) -> None:
    """Refused, never executed, and without torch's warning or its advice to use weights_only=False."""
    ckpt = tmp_path / "evil.pt"
    payload = {"w": _Evil(str(tmp_path / "pwned"))}
    if kind == "raw-pickle":
        import pickle

        ckpt.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, ckpt)
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(model=dict(builtin_model(), checkpoint=str(ckpt))))
    line = assert_user_error(compress(recipe, tmp_path / "run"), "model.checkpoint", "refusing to unpickle")
    assert "weights_only" not in line and "\x1b" not in line
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204 - would create a file if unpickled
        return (open, (self.path, "w"))


def test_negative_seed_in_the_recipe(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(seed=-1))
    assert_user_error(compress(recipe, tmp_path / "run"), "recipe.seed")


def test_binary_file_as_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "model.safetensors"
    recipe.write_bytes(bytes(range(256)) * 8)
    assert_user_error(compress(recipe, tmp_path / "run"), "recipe", str(recipe), "not a text file")
    assert not (tmp_path / "run").exists()


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (with one tiny IDAT): PIL's size check
    sees the claim without the test allocating the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["bomb", "corrupt", "truncated", "grayscale"])
def test_bad_image_that_is_not_first_in_its_class(tmp_path: Path, kind: str) -> None:
    """Every image is opened before any stage runs, not only each class's first one."""
    root = image_folder(tmp_path / "imgs")
    bad = root / "train" / "b" / "9.png"  # sorted after 0..2.png: never the first of its class
    if kind == "bomb":
        png_claiming(bad, 20000, 20000)
    elif kind == "corrupt":
        bad.write_bytes(b"this is not an image")
    elif kind == "truncated":
        write_png(bad, size=64)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        write_png(bad, mode="L")
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
    res = compress(recipe, tmp_path / "run")
    needle = {"bomb": "too large to decode safely", "corrupt": "cannot read image", "truncated": "cannot read image",
              "grayscale": "not 3-channel RGB"}[kind]
    assert_user_error(res, "data.train", str(bad), needle)
    assert not (tmp_path / "run").exists()


def test_bad_images_skipped_and_listed_when_asked(tmp_path: Path) -> None:
    from edgevit.data import build_data
    from edgevit.data.config import ImageFolderData
    from edgevit.models.sources import BuiltinSource, load_model

    root = image_folder(tmp_path / "imgs", per_class=4)
    (root / "train" / "a" / "2.png").write_bytes(b"not an image")
    png_claiming(root / "val" / "b" / "9.png", 20000, 20000)
    graph = load_model(BuiltinSource(source="builtin", kwargs=TINY_KWARGS))
    data = build_data(ImageFolderData.model_validate(imagefolder_data(root, bad_images="skip")), graph.spec, 0)
    assert len(data.train) == 7 and len(data.val) == 8
    assert sorted(Path(p).name for p, _ in data.skipped) == ["2.png", "9.png"]
    assert all(why for _, why in data.skipped)
    x, _ = next(iter(data.val_loader()))
    assert x.shape[0] == 8
    with pytest.raises(EdgeVitError, match="2.png"):  # off by default
        build_data(ImageFolderData.model_validate(imagefolder_data(root)), graph.spec, 0)


def test_class_folder_that_is_a_broken_symlink(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "c").symlink_to(tmp_path / "gone")
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe(data=imagefolder_data(root)))
    assert_user_error(compress(recipe, tmp_path / "run"), "data.train", str(root / "train" / "c"), "broken symlink")


def test_out_is_a_file(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe())
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert_user_error(compress(recipe, target), "--out", str(target), "is a file")
    assert target.read_text() == "mine"


def test_out_is_the_recipes_own_folder(tmp_path: Path) -> None:
    """`--out .` beside a commented recipe.yaml and a report.md: refused, both files untouched."""
    folder = tmp_path / "project"
    folder.mkdir()
    recipe = folder / "recipe.yaml"
    recipe.write_text("# my comments\n" + yaml.safe_dump(quick_recipe()))
    (folder / "report.md").write_text("my notes\n")
    before = snapshot(folder)
    res = run_cli("compress", "recipe.yaml", "--out", ".", cwd=folder)
    assert_user_error(res, "--out", "not an edgevit run", "recipe.yaml")
    assert snapshot(folder) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes a 0555 directory anyway")
def test_read_only_out(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        recipe = write_yaml(tmp_path / "r.yaml", quick_recipe())
        assert_user_error(compress(recipe, out), str(out), "Permission denied")
    finally:
        out.chmod(0o755)


def run_hooked(hook: str, *args: str) -> subprocess.CompletedProcess:
    from tests.test_run_safety import run_hooked as run

    return run(hook, *args)


def test_read_only_out_simulated(tmp_path: Path) -> None:
    """A read-only file system under --out (EROFS), simulated in the CLI's process (works as root)."""
    out = tmp_path / "ro"
    hook = f"""
        import errno, os
        _open = os.open
        def _ro(path, flags, *a, **k):
            if str(path).startswith({str(out)!r}) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return _open(path, flags, *a, **k)
        os.open = _ro
    """
    out.mkdir()
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe())
    res = run_hooked(hook, "compress", str(recipe), "--out", str(out))
    assert_user_error(res, str(out), "Read-only file system", "writable --out")


def test_full_disk_mid_run(tmp_path: Path) -> None:
    """ENOSPC while a stage saves its weights: one line; the finished stage is kept and a re-run resumes."""
    hook = """
        import errno
        import safetensors.torch as st
        _real = st.save_file
        def save_file(tensors, filename, metadata=None):
            if "01-adapt" in str(filename):
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
            _real(tensors, filename, metadata=metadata)
        st.save_file = save_file
    """
    recipe = write_yaml(tmp_path / "r.yaml", quick_recipe())
    out = tmp_path / "run"
    res = run_hooked(hook, "compress", str(recipe), "--out", str(out))
    assert_run_error(res, "No space left on device", "01-adapt", "free some space", "resumes")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["dir"] for s in manifest["stages"]] == ["00-source"]
    again = compress(recipe, out)
    assert again.returncode == 0, again.stderr
    assert "00-source: unchanged" in again.stderr and (out / "01-adapt" / "model.safetensors").is_file()


def test_damaged_manifest(finished_run: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    (out / "manifest.json").write_text('{"stages": [{"index": 0, "na')
    before = snapshot(out)
    recipe = write_yaml(tmp_path / "r.yaml", tiny_recipe_data())
    assert_user_error(compress(recipe, out), "manifest.json", "damaged")
    assert_user_error(run_cli("report", str(out)), "manifest.json", "damaged")
    assert snapshot(out) == before


def test_damaged_graph_json(finished_run: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """compress re-runs from the damaged stage (or with --no-rerun stops); report names it and fails in
    one line; as an input model (source: edgevit) it is one line too."""
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    (out / "01-adapt" / "graph.json").write_text('{"format": "edgevit.graph/1", "spec": {"blocks": [')
    recipe = write_yaml(tmp_path / "r.yaml", tiny_recipe_data())
    res = run_cli("report", str(out))  # says the file changed, then that it cannot be read
    assert "01-adapt/graph.json changed since its stage finished (sha256 mismatch)" in res.stderr
    assert_run_error(res, "report", "cannot rebuild the report")
    assert_user_error(compress(recipe, out, "--no-rerun"), "01-adapt/graph.json", "sha256", "--no-rerun")
    as_input = write_yaml(tmp_path / "in.yaml", quick_recipe(model={"source": "edgevit",
                                                                     "path": str(out / "01-adapt")}))
    assert_user_error(compress(as_input, tmp_path / "run2"), "model.path", "graph.json", "damaged")


def test_all_zero_layer_inputs_reaching_osscar(tmp_path: Path) -> None:
    """A model whose weights are all zero gives OSSCAR a zero Gram matrix. It used to end in
    LinAlgError; the per-column ridge has a floor, so H stays invertible and the prune runs."""
    from edgevit.models.simple_vit import SimpleViT

    ckpt = tmp_path / "zeros.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in SimpleViT(**TINY_KWARGS).state_dict().items()}, str(ckpt))
    recipe = write_yaml(tmp_path / "r.yaml", tiny_recipe_data(
        model=dict(builtin_model(), checkpoint=str(ckpt)), passes=[{"prune": {"method": "osscar", "mlp": 0.5}}]))
    res = compress(recipe, tmp_path / "run")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert (tmp_path / "run" / "01-prune" / "model.safetensors").is_file()


def test_inspect_empty_onnx(tmp_path: Path) -> None:
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    assert_user_error(run_cli("inspect", str(empty)), "inspect", str(empty), "empty")
