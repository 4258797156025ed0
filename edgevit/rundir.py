"""The run directory's integrity: who may write it, what it may hold, and whether a finished
stage's files are still the ones it finished with.

- :class:`RunLock`: one process writes a run dir at a time. The lock is ``flock`` on
  ``<run>/.lock`` (the kernel drops it when its holder dies, so a lock left by a killed run
  is stale by construction); the file names the holder's pid, host and start time for the
  one-line refusal, and a stale record is reported when taken over.
- :func:`check_out_dir`: ``--out`` is a directory (or absent), is not the recipe's own
  folder with the user's files in it, and never has the recipe among the files a run writes.
- :func:`stage_digests` / :func:`changed_file`: the sha256 of every file of a finished
  stage, recorded in the manifest, and the check that reuse makes against it.
- :func:`read_manifest`: the manifest, validated, or one line saying it is damaged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from edgevit.errors import EdgeVitError
from edgevit.fileio import sha256_file

LOCK_NAME = ".lock"
MANIFEST_NAME = "manifest.json"
EFFECTIVE_RECIPE = "recipe.effective.yaml"
RUN_FILES = {MANIFEST_NAME, EFFECTIVE_RECIPE, LOCK_NAME, "report.json", "report.md", "report.html", "plots",
             "measured"}
_STAGE = re.compile(r"^\.?\d\d-[A-Za-z0-9_.-]+$")  # NN-pass, .NN-pass.partial, .NN-pass.old
_TEMP = re.compile(r"^\..+\.tmp$")  # an atomic write a crash interrupted (fileio.atomic_path)


def write_error(path: Path, e: OSError) -> EdgeVitError:
    """An OSError from writing the run dir as one line: a full disk or a read-only place is the
    user's to fix, and nothing finished is lost."""
    where = e.filename or path
    reason = e.strerror or type(e).__name__
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
            errno.EROFS: "choose a writable --out"}.get(e.errno or 0, "fix the permissions or choose another --out")
    return EdgeVitError(f"{where}: {reason}; {hint} and run the same command again "
                        "(finished stages are kept and the run resumes)")


class RunLock:
    """Exclusive use of a run dir for the life of the ``with`` block."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the record of a dead holder this lock replaced

    def __enter__(self) -> RunLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise EdgeVitError(
                    f"--out {self.path.parent}: in use by another edgevit run ({_describe(holder)}); wait for "
                    "it to finish or stop it, or give another --out") from None
            try:  # the file may have been unlinked by a holder that just finished: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        old = _read_record(fd)
        if old and old.get("pid") != os.getpid():
            self.stale = old
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)  # releases the flock
            self.fd = None


def _read_record(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (ValueError, OSError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "its lock file names no process yet"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def check_out_dir(run_dir: Path, recipe: Path | None) -> None:
    """``--out`` must be a directory edgevit may fill: absent, empty, or an earlier run's.
    A folder holding other files (the recipe's own, say) is refused, so a run never writes
    over the user's recipe.yaml or report.md."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgeVitError(f"--out {run_dir}: is a file, not a directory; give a directory for the run")
    if recipe is not None and Path(recipe).resolve().parent == run_dir.resolve() and \
            Path(recipe).name in RUN_FILES:
        raise EdgeVitError(f"--out {run_dir}: the run would write over the recipe {recipe}; give another --out "
                           "(default: runs/<recipe name>)")
    if not run_dir.is_dir() or (run_dir / MANIFEST_NAME).is_file():
        return
    try:
        foreign = sorted(p.name for p in run_dir.iterdir()
                         if p.name not in RUN_FILES and not _STAGE.match(p.name) and not _TEMP.match(p.name))
    except OSError as e:
        raise EdgeVitError(f"--out {run_dir}: cannot read the directory: {e.strerror or e}") from e
    if foreign:
        raise EdgeVitError(f"--out {run_dir}: holds files that are not an edgevit run ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}); give an empty or new directory "
                           "(default: runs/<recipe name>)")


def read_manifest(path: Path) -> dict[str, Any]:
    """The run's manifest, checked field by field; a damaged one is one line, not a traceback."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise ValueError("no list of stages")
        for st in data["stages"]:
            if not isinstance(st, dict) or not isinstance(st.get("index"), int) or \
                    not all(isinstance(st.get(k), str) for k in ("name", "dir", "key")) or \
                    not _STAGE.match(st["dir"]) or not isinstance(st.get("files", {}), dict):
                raise ValueError(f"a malformed stage entry: {json.dumps(st)[:80]}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EdgeVitError(f"{path}: damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); move the "
                           "run directory away (or delete its manifest.json to re-run every stage)") from e
    return data


def stage_digests(stage_dir: Path) -> dict[str, str]:
    """sha256 of every file under a finished stage dir, by path relative to it."""
    stage_dir = Path(stage_dir)
    return {p.relative_to(stage_dir).as_posix(): sha256_file(p) for p in sorted(stage_dir.rglob("*")) if p.is_file()}


def changed_file(stage_dir: Path, digests: dict[str, str] | None) -> str | None:
    """The first file of a finished stage that is missing or no longer matches its sha256
    (``None``: all intact). A stage recorded without digests cannot be verified: it counts as changed."""
    if not digests:
        return "(no sha256 recorded)"
    for rel, digest in digests.items():
        path = Path(stage_dir) / rel
        if not path.is_file() or sha256_file(path) != digest:
            return rel
    return None
