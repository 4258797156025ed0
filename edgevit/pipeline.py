"""Runs a recipe's passes in order, one stage directory each, and resumes after the last
finished stage whose configuration (and everything upstream of it) is unchanged.

Layout of a run::

    runs/<name>/manifest.json        stages done, each with its chained config key
    runs/<name>/recipe.yaml          the effective recipe (after --set)
    runs/<name>/00-source/           the input model, copied (the input files are only read)
    runs/<name>/NN-<pass>/           graph.json, model.safetensors, metrics.json, artifacts
    runs/<name>/.NN-<pass>.partial/  a stage at work (its checkpoints); renamed when done
    runs/<name>/report.json|md       one entry per stage
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from edgevit import __version__
from edgevit.context import RunContext, StageRecord, resolve_device
from edgevit.data import build_data
from edgevit.errors import EdgeVitError
from edgevit.fileio import read_json, replace_dir, write_json, write_text
from edgevit.graph import HistoryEntry, ModelGraph
from edgevit.models.sources import load_model
from edgevit.profiles import load_profile
from edgevit.recipe import PassStep, Recipe, stable_hash
from edgevit.report import build_report
from edgevit.training import distributed

RUN_FORMAT = "edgevit.run/1"


def _stamp(path: Path | None) -> Any:
    """Identity of an input file for the resume key: size and mtime, not a full hash."""
    if path is None or not Path(path).exists():
        return None
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


class Pipeline:
    def __init__(self, recipe: Recipe, steps: list[PassStep], run_dir: Path, registry: Any,
                 console: Console | None = None, resume: bool = True) -> None:
        self.recipe, self.steps, self.run_dir = recipe, steps, Path(run_dir)
        self.registry = registry
        self.console = console or Console(stderr=True)
        self.resume = resume

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
        """Run (or resume) every stage; returns the report (empty on ranks other than 0)."""
        r = self.recipe
        device = resolve_device(r.device)
        env = distributed.current()
        if env.enabled and device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
        main = env.is_main
        torch.manual_seed(r.seed)
        # everything that can fail on bad input happens before the run dir is touched
        source = load_model(r.model, self.registry)
        profile = load_profile(r.profile) if r.profile else None
        data = build_data(r.data, source.spec, r.seed)
        self._check_classes(source, data.num_classes)
        where = f" ({env.world} processes)" if env.enabled else ""
        from edgevit.threads import current_threads  # chosen by the caller (edgevit.threads.apply_threads)

        threads = current_threads()
        self.console.print(f"edgevit compress: recipe [bold]{r.name}[/bold] → {self.run_dir}{where}, "
                           f"{threads} CPU thread{'s' if threads != 1 else ''}")

        manifest_path = self.run_dir / "manifest.json"
        old = read_json(manifest_path) if (self.resume and manifest_path.is_file()) else {"stages": []}
        old_stages = {s["index"]: s for s in old.get("stages", [])}
        env.barrier()  # every rank has read the old manifest before rank 0 changes anything
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False))

        keys = self.keys()
        names = ["source"] + [s.name for s in self.steps]
        records: list[StageRecord] = []
        done: list[dict[str, Any]] = []
        ctx = RunContext(recipe=r, run_dir=self.run_dir, data=data, device=device, console=self.console,
                         registry=self.registry, seed=r.seed, profile=profile,
                         _teacher=lambda: self._teacher(records))
        graph: ModelGraph | None = None
        reusing = self.resume
        for i, name in enumerate(names):
            final = self.run_dir / f"{i:02d}-{name}"
            prev = old_stages.get(i)
            finished = prev is not None and prev["key"] == keys[i] and prev["dir"] == final.name
            if reusing and finished and (final / "graph.json").is_file():
                self.console.print(f"[dim]✓ {final.name}: unchanged since the last run, reused[/dim]")
                assert prev is not None
                records.append(StageRecord(i, name, final, prev["seconds"]))
                done.append(prev)
                graph = None
                continue
            if reusing:
                reusing = False
                if main:
                    self._drop_stale(old_stages, i)
            if i == 0:
                graph, seconds = self._source_stage(source, final, keys[0]) if main else (None, 0.0)
            else:
                if graph is None:
                    graph = ModelGraph.load(records[-1].dir, self.registry)
                graph, seconds = self._pass_stage(self.steps[i - 1], graph, final, keys[i], ctx, records, env)
            if env.enabled:  # rank 0 wrote the stage; the others continue from its files
                env.barrier()
                graph = graph if main else None
            records.append(StageRecord(i, name, final, seconds))
            done.append({"index": i, "name": name, "dir": final.name, "key": keys[i], "seconds": round(seconds, 2),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            if main:
                write_json(manifest_path, {"format": RUN_FORMAT, "edgevit_version": __version__, "recipe": r.name,
                                           "stages": done})
        return build_report(self.run_dir) if main else {}

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
        out = p.run(graph, ctx.for_stage(partial, records))
        seconds = time.perf_counter() - t0
        if not env.is_main:
            return None, seconds
        config = step.config.model_dump(mode="json")
        out.history.append(HistoryEntry(pass_name=step.name, stage=final.name, config=config, metrics=p.metrics))
        out.save(partial, weights_from=None if p.modifies_weights else weights_from)
        self._write_metrics(partial, step.name, config, p.metrics, out, seconds)
        shutil.rmtree(partial / "checkpoint", ignore_errors=True)
        replace_dir(partial, final)
        self.console.print(f"[green]✓[/green] {final.name} ({seconds:.1f} s)")
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

    def _drop_stale(self, old_stages: dict[int, dict[str, Any]], start: int) -> None:
        for idx, st in old_stages.items():
            if idx >= start:
                shutil.rmtree(self.run_dir / st["dir"], ignore_errors=True)

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
