"""Runs a recipe's passes in order, one stage directory each, and resumes after the last
finished stage whose configuration (and everything upstream of it) is unchanged.

Layout of a run::

    runs/<name>/manifest.json        stages done, each with its chained config key and the
                                     sha256 of every file it finished with
    runs/<name>/recipe.effective.yaml  the effective recipe (after --set)
    runs/<name>/.lock                held (flock) by the one process writing the run
    runs/<name>/00-source/           the input model, copied (the input files are only read)
    runs/<name>/NN-<pass>/           graph.json, model.safetensors, metrics.json, artifacts
    runs/<name>/.NN-<pass>.partial/  a stage at work (its checkpoints); renamed when done
    runs/<name>/report.json|md       one entry per stage
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

from edgevit import __version__
from edgevit.context import RunContext, StageRecord, resolve_device
from edgevit.data import build_data
from edgevit.errors import EdgeVitError, RunInterrupted, SignalStop
from edgevit.fileio import replace_dir, write_json, write_text
from edgevit.graph import HistoryEntry, ModelGraph
from edgevit.models.sources import load_model
from edgevit.profiles import load_profile
from edgevit.recipe import PassStep, Recipe, stable_hash
from edgevit.report import build_report
from edgevit.rundir import (
    EFFECTIVE_RECIPE,
    MANIFEST_NAME,
    RunLock,
    changed_file,
    check_out_dir,
    read_manifest,
    stage_digests,
    write_error,
)
from edgevit.training import distributed

RUN_FORMAT = "edgevit.run/1"
_FINISHED = re.compile(r"^\d\d-[A-Za-z0-9_.-]+$")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def headline(metrics: dict[str, Any]) -> str:
    """A training stage's validation result for its ``✓`` line (a recovery's when it has one):
    top-1 for classification, mIoU and pixel accuracy for segmentation; empty for other passes."""
    m = metrics.get("recover") if isinstance(metrics.get("recover"), dict) else metrics
    if m.get("val_miou") is not None:
        acc = m.get("val_pixel_accuracy")
        return f": val mIoU {m['val_miou']:.2f} %" + (f", pixel accuracy {acc:.2f} %" if acc is not None else "")
    if m.get("val_top1") is not None:
        return f": val top-1 {m['val_top1']:.2f} %"
    return ""


def _stamp(path: Path | None) -> Any:
    """Identity of an input file for the resume key: size and mtime, not a full hash."""
    if path is None or not Path(path).exists():
        return None
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


class Pipeline:
    def __init__(self, recipe: Recipe, steps: list[PassStep], run_dir: Path, registry: Any,
                 console: Console | None = None, resume: bool = True, rerun_changed: bool = True,
                 recipe_path: Path | None = None) -> None:
        self.recipe, self.steps, self.run_dir = recipe, steps, Path(run_dir)
        self.registry = registry
        self.console = console or Console(stderr=True)
        self.resume = resume
        self.rerun_changed = rerun_changed  # False: a finished stage whose files changed is an error
        self.recipe_path = recipe_path  # the user's recipe file, never written over

    def keys(self) -> list[str]:
        """One key per stage, each hashing its own config and the key before it."""
        r = self.recipe
        src = r.model.model_dump(mode="json")
        root = stable_hash({
            "model": src,
            "files": [_stamp(getattr(r.model, "checkpoint", None)), _stamp(getattr(r.model, "path", None))],
            "data": r.data.model_dump(mode="json"),
            "calibration": r.calibration.model_dump(mode="json"),
            "seed": r.seed,
        })
        keys = [root]
        for step in self.steps:
            keys.append(stable_hash([keys[-1], step.config_hash()]))
        return keys

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; returns the report (empty on ranks other than 0).

        Everything that can be checked is checked before the run dir is touched: the model, the
        data (every image), each pass's preflight against the profile, the output directory.
        Then the run dir is locked, finished stages are verified against their sha256s, and only
        then is anything stale deleted."""
        try:
            return self._run()
        except SignalStop as e:
            raise self._interrupted(e) from None

    def _run(self) -> dict[str, Any]:
        r = self.recipe
        env = distributed.current()
        torch.manual_seed(r.seed)
        self._current: str | None = None
        self._records: list[StageRecord] = []
        ctx = self._validate(env)
        lock = RunLock(self.run_dir) if env.is_main else contextlib.nullcontext()
        if env.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(self.run_dir, e) from e
        with lock:
            env.barrier()  # rank 0 holds the lock before any rank reads the manifest
            done, start = self._plan()
            env.barrier()  # every rank has planned before rank 0 changes anything
            where = f" ({env.world} processes)" if env.enabled else ""
            from edgevit.threads import current_threads  # chosen by the caller (edgevit.threads.apply_threads)

            threads = current_threads()
            task = ctx.data.task
            what = (f" ({task}, {ctx.data.num_classes} classes)" if task != "classification" else "")
            self.console.print(f"edgevit compress: recipe [bold]{r.name}[/bold]{what} → {self.run_dir}{where}, "
                               f"{threads} CPU thread{'s' if threads != 1 else ''}")
            if isinstance(lock, RunLock) and lock.stale:
                self.console.print(f"[dim]took over the lock of a run that is gone "
                                   f"(pid {lock.stale.get('pid')} on {lock.stale.get('host')})[/dim]")
            try:
                return self._run_stages(ctx, env, done, start)
            except OSError as e:
                if e.errno in _WRITE_ERRNOS:
                    raise write_error(self.run_dir, e) from e
                raise

    def _validate(self, env: distributed.DistEnv) -> RunContext:
        """Load the model and data and ask every pass whether it can run: the run dir is not touched."""
        r = self.recipe
        device = resolve_device(r.device)
        if env.enabled and device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
        source = load_model(r.model, self.registry)
        profile = load_profile(r.profile) if r.profile else None
        adapt_first = bool(self.steps) and self.steps[0].name == "adapt"  # it fits a head of the data's classes
        data = build_data(r.data, source.spec, r.seed, check_classes=not adapt_first)
        self._check_classes(source, data.num_classes)
        if env.is_main:
            check_out_dir(self.run_dir, self.recipe_path)
        self._source = source
        ctx = RunContext(recipe=r, run_dir=self.run_dir, data=data, device=device, console=self.console,
                         registry=self.registry, seed=r.seed, profile=profile,
                         _teacher=lambda: self._teacher(self._records))
        for step in self.steps:
            step.cls.preflight(step.config, ctx, f"passes[{step.index}].{step.name}")
        if data.skipped:
            shown = "; ".join(f"{p}: {why}" for p, why in data.skipped[:5])
            more = f" and {len(data.skipped) - 5} more" if len(data.skipped) > 5 else ""
            self.console.print(f"[yellow]warning:[/yellow] data: skipped {len(data.skipped)} unreadable "
                               f"images ({shown}{more})")
        return ctx

    def _plan(self) -> tuple[list[dict[str, Any]], int]:
        """The finished stages that still hold (same key, files unchanged) and the first index to run."""
        manifest_path = self.run_dir / MANIFEST_NAME
        old = read_manifest(manifest_path) if (self.resume and manifest_path.is_file()) else {"stages": []}
        old_stages = {s["index"]: s for s in old["stages"]}
        keys = self.keys()
        done: list[dict[str, Any]] = []
        for i, name in enumerate(["source"] + [s.name for s in self.steps]):
            prev = old_stages.get(i)
            final = self.run_dir / f"{i:02d}-{name}"
            if prev is None or prev["key"] != keys[i] or prev["dir"] != final.name or not final.is_dir():
                return done, i
            if not prev.get("files"):
                self.console.print(f"[yellow]warning:[/yellow] {final.name}: finished without recorded sha256s "
                                   f"(an older edgevit); re-running from {final.name}")
                return done, i
            changed = changed_file(final, prev["files"])
            if changed is not None:
                if not self.rerun_changed:
                    raise EdgeVitError(f"{final / changed}: changed since {final.name} finished (sha256 mismatch); "
                                       "restore it, or run without --no-rerun to re-run from that stage")
                self.console.print(f"[yellow]warning:[/yellow] {final.name}: {changed} changed since the stage "
                                   f"finished (sha256 mismatch); re-running from {final.name}")
                return done, i
            done.append(prev)
        return done, len(keys)

    def _run_stages(self, ctx: RunContext, env: distributed.DistEnv, done: list[dict[str, Any]],
                    start: int) -> dict[str, Any]:
        r = self.recipe
        main = env.is_main
        keys = self.keys()
        names = ["source"] + [s.name for s in self.steps]
        manifest_path = self.run_dir / MANIFEST_NAME
        if main:
            write_text(self.run_dir / EFFECTIVE_RECIPE, yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False))
            self._write_manifest(manifest_path, done)  # first the manifest forgets the stale stages,
            self._drop_stale({st["dir"] for st in done})  # then their directories go
        records = self._records
        graph: ModelGraph | None = None
        for i, name in enumerate(names):
            final = self.run_dir / f"{i:02d}-{name}"
            self._current = final.name
            if i < start:
                self.console.print(f"[dim]✓ {final.name}: unchanged since the last run, reused[/dim]")
                records.append(StageRecord(i, name, final, done[i]["seconds"]))
                continue
            if i == 0:
                graph, seconds = self._source_stage(self._source, final, keys[0]) if main else (None, 0.0)
            else:
                if graph is None:
                    graph = ModelGraph.load(records[-1].dir, self.registry)
                graph, seconds = self._pass_stage(self.steps[i - 1], graph, final, keys[i], ctx, records, env)
            if env.enabled:  # rank 0 wrote the stage; the others continue from its files
                env.barrier()
                graph = graph if main else None
            records.append(StageRecord(i, name, final, seconds))
            done.append({"index": i, "name": name, "dir": final.name, "key": keys[i], "seconds": round(seconds, 2),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "files": stage_digests(final) if main else {}})
            if main:
                self._write_manifest(manifest_path, done)
        self._current = None
        return build_report(self.run_dir) if main else {}

    def _write_manifest(self, path: Path, done: list[dict[str, Any]]) -> None:
        write_json(path, {"format": RUN_FORMAT, "edgevit_version": __version__, "recipe": self.recipe.name,
                          "stages": done})

    def _interrupted(self, e: SignalStop) -> RunInterrupted:
        """Ctrl-C or SIGTERM as one line: where the run stopped and that a re-run resumes."""
        sig = "Ctrl-C" if e.signum == signal.SIGINT else signal.Signals(e.signum).name
        finished = [rec.dir.name for rec in getattr(self, "_records", [])]
        current = getattr(self, "_current", None)
        where = f"during {current}" if current else "before any stage ran"
        if len(finished) > 1:
            kept = f"finished stages {finished[0]} to {finished[-1]} are kept"
        else:
            kept = f"finished stage {finished[0]} is kept" if finished else "no stage had finished"
        resume = " (a training stage continues after its last finished epoch)" if current else ""
        return RunInterrupted(f"interrupted ({sig}) {where}; {kept}; run the same command again to resume{resume}",
                              128 + int(e.signum))

    # stages ---------------------------------------------------------------------------
    def _source_stage(self, source: ModelGraph, final: Path, key: str) -> tuple[ModelGraph, float]:
        t0 = time.perf_counter()
        partial = self._partial(final, key)
        source.history.append(HistoryEntry(pass_name="source", stage=final.name,
                                           config=self.recipe.model.model_dump(mode="json")))
        source.save(partial)
        self._write_metrics(partial, "source", {}, {"built_from": source.describe_build()}, source, 0.0)
        replace_dir(partial, final)
        self.console.print(f"[green]✓[/green] {final.name}: {source.describe_build()}, "
                           f"{source.num_params() / 1e6:.2f} M params, {source.cost().macs / 1e6:.1f} M MACs")
        return ModelGraph.load(final, self.registry), time.perf_counter() - t0

    def _pass_stage(self, step: PassStep, graph: ModelGraph, final: Path, key: str, ctx: RunContext,
                    records: list[StageRecord], env: distributed.DistEnv) -> tuple[ModelGraph | None, float]:
        partial = final.with_name(f".{final.name}.partial")
        if env.is_main:
            self._partial(final, key)
        env.barrier()
        self.console.print(f"[bold]▶ {final.name}[/bold]")
        weights_from = graph.weights_path
        t0 = time.perf_counter()
        p = step.cls(step.config)
        if not env.is_main and not getattr(step.cls, "distributed", False):
            return None, 0.0  # rank 0 alone runs passes that do not train
        if p.modifies_weights:  # an ONNX (or bundle) of the old weights no longer describes this model
            graph.artifacts.pop("onnx", None)
            graph.artifacts.pop("bundle", None)
        try:
            out = p.run(graph, ctx.for_stage(partial, records))
        except (np.linalg.LinAlgError, torch.linalg.LinAlgError) as e:
            raise EdgeVitError(
                f"passes[{step.index}].{step.name}: a linear solve failed ({str(e).splitlines()[0]}): the layer "
                "inputs are degenerate (all zero or constant?); check the model's weights and the calibration "
                "images") from e
        seconds = time.perf_counter() - t0
        if not env.is_main:
            return None, seconds
        config = step.config.model_dump(mode="json")
        out.history.append(HistoryEntry(pass_name=step.name, stage=final.name, config=config, metrics=p.metrics))
        out.save(partial, weights_from=None if p.modifies_weights else weights_from)
        self._write_metrics(partial, step.name, config, p.metrics, out, seconds)
        for name in ("checkpoint", ".checkpoint.new", ".checkpoint.old"):
            shutil.rmtree(partial / name, ignore_errors=True)
        replace_dir(partial, final)
        self.console.print(f"[green]✓[/green] {final.name} ({seconds:.1f} s){headline(p.metrics)}")
        return ModelGraph.load(final, self.registry), seconds

    # helpers --------------------------------------------------------------------------
    def _partial(self, final: Path, key: str) -> Path:
        """The stage's work dir; kept across a crash so the pass can resume from its checkpoints."""
        partial = final.with_name(f".{final.name}.partial")
        key_file = partial / ".key"
        if partial.exists() and (not key_file.is_file() or key_file.read_text() != key):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        return partial

    def _drop_stale(self, keep: set[str]) -> None:
        """Finished stage dirs the manifest no longer lists (their work dirs stay: a key check decides)."""
        for d in self.run_dir.iterdir():
            if d.is_dir() and _FINISHED.match(d.name) and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def _write_metrics(self, directory: Path, name: str, config: dict, metrics: dict, graph: ModelGraph,
                       seconds: float) -> None:
        cost = graph.cost()
        write_json(directory / "metrics.json", {
            "pass": name, "config": config, "seconds": round(seconds, 2), "metrics": metrics,
            "model": {"params": graph.num_params(), "macs": cost.macs, "flops": cost.flops,
                      "param_bytes": cost.param_bytes, "peak_activation_bytes": cost.peak_activation_bytes,
                      "layers": [{"name": x.name, "kind": x.kind, "block": x.block, "flops": x.flops}
                                 for x in cost.layers]},
        })

    def _teacher(self, records: list[StageRecord]) -> ModelGraph:
        adapted = [r for r in records if r.name == "adapt"]
        return ModelGraph.load((adapted[-1] if adapted else records[0]).dir, self.registry)

    def _check_classes(self, source: ModelGraph, num_classes: int) -> None:
        first = self.steps[0].name if self.steps else None
        if source.spec.num_classes != num_classes and first != "adapt":
            raise EdgeVitError(
                f"model: has {source.spec.num_classes} classes but the data has {num_classes}; "
                "put an `adapt` pass first to fit a new classifier head"
            )
