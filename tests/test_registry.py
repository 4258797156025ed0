"""The pass registry: built-ins, third-party passes from the ``edgevit.passes`` entry points.

Plugins here are real distributions: a package and a ``*.dist-info`` with ``entry_points.txt``
written under tmp_path and put on ``sys.path`` (in-process) or ``PYTHONPATH`` (subprocess).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from edgevit.errors import EdgeVitError
from edgevit.passes.base import Pass, PassConfig
from edgevit.registry import BUILTINS, Registry
from tests.conftest import run_cli, tiny_recipe_data

PLUGIN_SOURCE = '''
"""A third-party pass for the registry tests."""

from pydantic import Field

from edgevit.passes.base import Pass, PassConfig


class DemoConfig(PassConfig):
    factor: int = Field(2, ge=1)


class DemoPass(Pass):
    name = "plugindemo"
    Config = DemoConfig
    summary = "a demo plugin pass that only measures"
    modifies_weights = False

    def run(self, graph, ctx):
        (ctx.stage_dir / "demo.txt").write_text("written by the demo plugin")
        self.metrics = {
            "demo_params_times_factor": graph.num_params() * self.config.factor,
            "demo_stage_dir": ctx.stage_dir.name,
            "demo_previous_stages": [s.dir.name for s in ctx.stages],
        }
        return graph
'''


def make_dist(root: Path, dist: str, entry_points: dict[str, str], source: str | None = None,
              group: str = "passes") -> Path:
    """A minimal installed distribution ``dist`` under ``root``: a package and its dist-info,
    its ``entry_points`` in the ``edgevit.<group>`` entry-point group."""
    if source is not None:
        pkg = root / dist
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[edgevit.{group}]\n{lines}")
    return root


@pytest.fixture
def demo_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_dist(tmp_path / "site", "edgevit_plugin_demo",
                     {"plugindemo": "edgevit_plugin_demo:DemoPass"}, PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("edgevit_plugin_demo", None)


# built-ins ------------------------------------------------------------------------------------
def test_builtins_without_plugins() -> None:
    reg = Registry(plugins=False)
    assert reg.names("passes") == sorted(BUILTINS["passes"])
    for name in reg.names("passes"):
        cls = reg.get("passes", name)
        assert issubclass(cls, Pass) and cls.name == name
        # the contract that matters: every pass config refuses unknown keys
        assert issubclass(cls.Config, BaseModel) and cls.Config.model_config.get("extra") == "forbid"
    assert {e.origin for e in reg.entries("passes")} == {"edgevit"}


def test_unknown_pass_lists_available() -> None:
    reg = Registry()
    with pytest.raises(EdgeVitError) as exc:
        reg.get("passes", "nope")
    msg = str(exc.value)
    assert "unknown pass 'nope'" in msg
    assert f"available: {', '.join(reg.names('passes'))}" in msg
    assert "did you mean" not in msg


def test_unknown_pass_suggests_close_name() -> None:
    with pytest.raises(EdgeVitError, match=r"passes\[3\]: unknown pass 'adpat' \(did you mean 'adapt'\?\)"):
        Registry().get("passes", "adpat", where="passes[3]")


# plugins --------------------------------------------------------------------------------------
def test_plugin_is_listed_and_loaded(demo_plugin: Path) -> None:
    reg = Registry()
    assert "plugindemo" in reg.names("passes")
    assert set(BUILTINS["passes"]) <= set(reg.names("passes"))
    cls = reg.get("passes", "plugindemo")
    import edgevit_plugin_demo

    assert cls is edgevit_plugin_demo.DemoPass
    assert issubclass(cls, Pass) and cls.name == "plugindemo" and not cls.modifies_weights
    assert issubclass(cls.Config, PassConfig)
    entry = {e.name: e for e in reg.entries("passes")}["plugindemo"]
    assert entry.origin == "edgevit_plugin_demo"
    assert entry.target == "edgevit_plugin_demo:DemoPass"
    # a registry that ignores plugins does not see it
    assert "plugindemo" not in Registry(plugins=False).names("passes")


def test_plugin_is_invisible_without_its_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dist(tmp_path / "site", "edgevit_plugin_demo",
                     {"plugindemo": "edgevit_plugin_demo:DemoPass"}, PLUGIN_SOURCE)
    assert "plugindemo" not in Registry().names("passes")  # written, but not installed (not on the path)
    monkeypatch.syspath_prepend(str(root))
    assert "plugindemo" in Registry().names("passes")  # the same dist once installed: the check above can fail
    sys.modules.pop("edgevit_plugin_demo", None)


def test_edits_sides_and_tuners_are_registered() -> None:
    from edgevit.graph.extension import SideModule
    from edgevit.tuners.base import Tuner, TunerConfigBase

    reg = Registry(plugins=False)
    assert set(reg.names("edits")) >= {"keep_heads", "keep_mlp_units", "keep_blocks", "reset_classifier",
                                      "attach_side", "detach_side"}
    assert all(callable(reg.get("edits", n)) for n in reg.names("edits"))
    for name in reg.names("sides"):
        cls = reg.get("sides", name)
        assert issubclass(cls, SideModule) and cls.kind == name
    for name in reg.names("tuners"):
        cls = reg.get("tuners", name)
        assert issubclass(cls, Tuner) and cls.name == name
        # each tuner carries its strict config, and a side module it attaches is a registered one
        assert issubclass(cls.Config, TunerConfigBase) and cls.Config.model_config.get("extra") == "forbid"
        assert cls.side is None or reg.get("sides", cls.side).kind == cls.side
    assert {n for n in reg.names("tuners") if reg.get("tuners", n).side} == {"losa", "disentangled"}
    with pytest.raises(EdgeVitError, match="unknown graph edit 'keep_head' \\(did you mean 'keep_heads'"):
        reg.get("edits", "keep_head")


def test_side_modules_resolve_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph finds a saved side module's class in the registry (no graph → tuners import)."""
    from edgevit.graph import ModelGraph

    stage = Path(__file__).parent / "fixtures" / "v1_side"
    assert ModelGraph.load(stage).side.kind == "losa"
    monkeypatch.setitem(BUILTINS, "sides", {})
    with pytest.raises(EdgeVitError, match="unknown side module 'losa'"):
        ModelGraph.load(stage)


def test_plugin_claiming_a_builtin_name(demo_plugin: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    clash = make_dist(tmp_path / "clash", "edgevit_plugin_clash",
                      {"adapt": "edgevit_plugin_clash:MyAdapt"}, "class MyAdapt: ...\n")
    monkeypatch.syspath_prepend(str(clash))
    with pytest.raises(EdgeVitError) as exc:
        Registry()
    msg = str(exc.value)
    assert "edgevit_plugin_clash" in msg and "'adapt'" in msg and "edgevit" in msg
    # without plugins the built-ins still work
    assert Registry(plugins=False).get("passes", "adapt").name == "adapt"


def test_plugin_with_broken_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dist(tmp_path / "broken", "edgevit_plugin_broken",
                     {"brokenpass": "edgevit_plugin_broken:Missing"}, "X = 1\n")
    monkeypatch.syspath_prepend(str(root))
    reg = Registry()
    assert "brokenpass" in reg.names("passes")
    with pytest.raises(EdgeVitError, match=r"pass 'brokenpass' from edgevit_plugin_broken cannot be loaded"):
        reg.get("passes", "brokenpass")
    sys.modules.pop("edgevit_plugin_broken", None)


def test_plugin_config_is_validated(demo_plugin: Path) -> None:
    from edgevit.recipe import parse_recipe

    data = tiny_recipe_data(passes=[{"plugindemo": {"factr": 3}}])
    with pytest.raises(EdgeVitError, match=r"passes\[0\]\.plugindemo\.factr: unknown key \(did you mean 'factor'"):
        parse_recipe(data, demo_plugin, Registry())
    data = tiny_recipe_data(passes=[{"plugindemo": {"factor": 3}}])
    _, steps = parse_recipe(data, demo_plugin, Registry())
    assert steps[0].name == "plugindemo" and steps[0].config.factor == 3


def _with_pythonpath(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), *([old] if old else [])]))


def test_passes_command_lists_plugin(demo_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_pythonpath(monkeypatch, demo_plugin)
    res = run_cli("passes")
    assert res.returncode == 0, res.stderr
    assert "plugindemo" in res.stdout and "edgevit_plugin_demo" in res.stdout
    assert "factor" in res.stdout


def test_plugin_pass_runs_in_pipeline(demo_plugin: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _with_pythonpath(monkeypatch, demo_plugin)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_data(passes=[
        {"adapt": {"epochs": 1, "lr": 0.002, "warmup_epochs": 0}},
        {"plugindemo": {"factor": 3}},
    ])))
    out = tmp_path / "run"
    res = run_cli("compress", str(recipe), "--out", str(out))
    assert res.returncode == 0, res.stderr

    stage = out / "02-plugindemo"
    assert stage.is_dir(), sorted(p.name for p in out.iterdir())
    assert (stage / "demo.txt").read_text() == "written by the demo plugin"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["pass"] == "plugindemo"
    assert metrics["config"] == {"factor": 3}
    m = metrics["metrics"]
    assert m["demo_params_times_factor"] == 3 * metrics["model"]["params"]
    assert m["demo_stage_dir"] == ".02-plugindemo.partial"  # the pass writes into the partial dir
    assert m["demo_previous_stages"] == ["00-source", "01-adapt"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["dir"] for s in manifest["stages"]] == ["00-source", "01-adapt", "02-plugindemo"]
    report = (out / "report.json").read_text()
    assert "plugindemo" in report


def test_refusals_name_the_model_as_the_user_gave_it() -> None:
    import timm

    reg = Registry(plugins=False)
    with pytest.raises(EdgeVitError, match=r"^model: timm resnet18 \(ResNet\) is not a supported Vision Transformer"):
        reg.adapter_for(timm.create_model("resnet18", pretrained=False, num_classes=3))
    pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from edgevit.graph.adapters.hf_vit import HFImageClassifier

    cfg = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=3)
    with pytest.raises(EdgeVitError, match="^model: Hugging Face ConvNextForImageClassification is not a supported"):
        reg.adapter_for(HFImageClassifier(ConvNextForImageClassification(cfg)))


# plugin tuners --------------------------------------------------------------------------------
TUNER_PLUGIN_SOURCE = '''
"""A third-party tuner for the registry tests: trains only the LayerNorms of chosen blocks."""

from typing import Annotated, Literal

from pydantic import Field

from edgevit.tuners.base import Tuner, TunerConfigBase, count, freeze_all, unfreeze_all


class NormsConfig(TunerConfigBase):
    name: Literal["pluginnorms"] = "pluginnorms"
    blocks: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    head: bool = True


class NormsTuner(Tuner):
    name = "pluginnorms"
    Config = NormsConfig

    def setup(self, graph):
        freeze_all(graph.module)
        paths = [p for b in self.cfg.blocks for p in (graph.spec.block(b).norm1, graph.spec.block(b).norm2)]
        paths += list(graph.spec.classifiers) if self.cfg.head else []
        params = []
        for path in paths:
            for n, p in graph.module.get_submodule(path).named_parameters():
                p.requires_grad_(True)
                params.append((f"{path}.{n}", p))
        self.trainable, self.steps = count(params), 0
        return params

    def after_step(self, step, optimizer):
        self.steps += 1

    def finish(self, graph):
        unfreeze_all(graph.module)

    def summary(self):
        return {"name": self.name, "trainable_params": self.trainable, "added_params": 0, "steps": self.steps}


class SideConfig(TunerConfigBase):
    name: Literal["pluginside"] = "pluginside"


class SideTuner(Tuner):
    """Declares a side module (never trained here): only its ``side`` attribute is under test."""

    name = "pluginside"
    Config = SideConfig
    side = "pluginsidemodule"


class NotATuner:
    name = "notatuner"
'''


@pytest.fixture
def tuner_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_dist(tmp_path / "tsite", "edgevit_plugin_tuner",
                     {"pluginnorms": "edgevit_plugin_tuner:NormsTuner", "pluginside": "edgevit_plugin_tuner:SideTuner",
                      "notatuner": "edgevit_plugin_tuner:NotATuner"},
                     TUNER_PLUGIN_SOURCE, group="tuners")
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("edgevit_plugin_tuner", None)


def test_plugin_tuner_named_in_a_recipe_trains_only_what_it_chose(tuner_plugin: Path, tmp_path: Path) -> None:
    """adapt and distill build the plugin's tuner from its recipe name: adapt changes exactly the
    LayerNorms of the block the recipe chose, and distill keeps its feature losses (no side module)."""
    from edgevit.graph import ModelGraph
    from edgevit.recipe import parse_recipe
    from tests.conftest import run_pipeline

    passes = [{"adapt": {"epochs": 1, "lr": 0.01, "warmup_epochs": 0,
                         "tuner": {"name": "pluginnorms", "blocks": [1], "head": False}}},
              {"distill": {"student": {"shrink": {"depth": 1}}, "epochs": 1, "warmup_epochs": 0,
                           "tuner": "pluginnorms"}}]
    data = tiny_recipe_data(passes=passes)
    with pytest.raises(EdgeVitError, match=r"^passes\[0\]\.adapt\.tuner: unknown tuner 'pluginnorms'"):
        parse_recipe(yaml.safe_load(yaml.safe_dump(data)), tmp_path, Registry(plugins=False))  # only by the registry
    report, log = run_pipeline(data, tmp_path / "run")
    adapt = json.loads((tmp_path / "run" / "01-adapt" / "metrics.json").read_text())
    assert adapt["config"]["tuner"] == {"name": "pluginnorms", "blocks": [1], "head": False}
    m = adapt["metrics"]["tuner"]
    embed = 32
    assert m == {"name": "pluginnorms", "trainable_params": 4 * embed, "added_params": 0, "steps": m["steps"]}
    assert m["steps"] > 0 and "tuner pluginnorms: 128 trainable parameters, 0 added" in log
    before = dict(ModelGraph.load(tmp_path / "run" / "00-source").module.named_parameters())
    after = dict(ModelGraph.load(tmp_path / "run" / "01-adapt").module.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed == {f"blocks.1.{norm}.{w}" for norm in ("norm1", "norm2") for w in ("weight", "bias")}
    distill = json.loads((tmp_path / "run" / "02-distill" / "metrics.json").read_text())["metrics"]
    assert distill["tuner"]["name"] == "pluginnorms" and distill["tuner"]["steps"] > 0
    assert distill["tuner"]["trainable_params"] == 4 * embed + (embed + 1) * 10  # block 0's norms + the head
    assert "feature mimicking and MGD are off" not in log


def test_plugin_tuner_config_errors_are_one_line_with_the_path(tuner_plugin: Path, tmp_path: Path) -> None:
    from edgevit.recipe import parse_recipe

    cases = [
        ([{"distill": {"student": {"shrink": {"depth": 1}}, "tuner": {"name": "pluginnorms", "blocks": [-1]}}}],
         r"passes[0].distill.tuner.blocks[0]: Input should be greater than or equal to 0"),
        ([{"export": {}}, {"prune": {"recover": {"tuner": {"name": "pluginnorms", "hed": False}}}}],
         r"passes[1].prune.recover.tuner.hed: unknown key"),
        ([{"adapt": {"tuner": {"name": "pluginnorms", "head": "sometimes"}}}],
         r"passes[0].adapt.tuner.head: Input should be a valid boolean"),
        ([{"adapt": {"tuner": "notatuner"}}],
         r"passes[0].adapt.tuner: tuner 'notatuner' from edgevit_plugin_tuner is not an edgevit.tuners.base.Tuner"),
    ]
    for passes, expected in cases:
        with pytest.raises(EdgeVitError) as exc:
            parse_recipe(tiny_recipe_data(passes=passes), tmp_path, Registry())
        msg = str(exc.value)
        assert msg.startswith(expected) and "\n" not in msg, msg
    # a config built in Python (no validation context) finds the plugin through a fresh registry
    from edgevit.passes.adapt import AdaptConfig

    assert AdaptConfig(tuner={"name": "pluginnorms", "blocks": [0, 1]}).tuner.blocks == [0, 1]
    assert AdaptConfig().tuner.name == "full"


def test_a_plugin_tuners_side_module_is_its_class_property(tuner_plugin: Path) -> None:
    """Whether a tuner suits a segmenter is read from the registered class, not a list of names."""
    from edgevit.passes.adapt import AdaptConfig
    from edgevit.tuners import check_tuner_task

    reg = Registry()
    check_tuner_task(AdaptConfig(tuner="pluginnorms").tuner, "segmentation", "passes[0].adapt", reg)
    with pytest.raises(EdgeVitError, match=r"^passes\[0\]\.adapt\.tuner: pluginside's side module predicts one class"):
        check_tuner_task(AdaptConfig(tuner="pluginside").tuner, "segmentation", "passes[0].adapt", reg)
    check_tuner_task(AdaptConfig(tuner="pluginside").tuner, "classification", "passes[0].adapt", reg)


def test_unknown_tuner_lists_the_registered_ones_through_the_cli(tuner_plugin: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_bad_input import assert_user_error

    _with_pythonpath(monkeypatch, tuner_plugin)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_data(passes=[{"adapt": {"tuner": {"name": "pluginnrms"}}}])))
    res = run_cli("compress", str(recipe), "--out", str(tmp_path / "run"))
    assert_user_error(res, "passes[0].adapt.tuner: unknown tuner 'pluginnrms' (did you mean 'pluginnorms'?)",
                      "available: disentangled, full, losa, notatuner, pluginnorms, pluginside, slicefine")
    assert not (tmp_path / "run").exists()
