"""Model sources, data sources, recipe overrides, and the small CLI commands."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgevit.data import build_data
from edgevit.data.config import ImageFolderData, NpzData
from edgevit.errors import EdgeVitError
from edgevit.graph import ModelGraph
from edgevit.graph.weights import read_state_dict
from edgevit.models.simple_vit import SimpleViT
from edgevit.models.sources import BuiltinSource, HFSource, SavedSource, TimmSource, load_model
from edgevit.recipe import apply_overrides
from tests.conftest import run_cli, tiny_recipe_data

X = torch.randn(2, 3, 32, 32)


def test_timm_by_name_with_kwargs() -> None:
    g = load_model(TimmSource(source="timm", name="vit_tiny_patch16_224",
                              kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3}))
    assert (g.spec.depth, g.spec.embed_dim, g.spec.num_classes, g.spec.num_tokens) == (2, 192, 3, 17)
    assert g.build == {"name": "vit_tiny_patch16_224",
                       "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3}}


def test_timm_name_or_architecture_required() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TimmSource(source="timm")


def test_hf_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=4)
    hf = ViTForImageClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                          "image_std": [0.4, 0.5, 0.6]}))
    g = load_model(HFSource(source="hf", path=tmp_path / "hf"))
    assert g.spec.family == "hf" and g.spec.mean == (0.1, 0.2, 0.3) and g.spec.std == (0.4, 0.5, 0.6)
    with torch.no_grad():
        assert torch.allclose(g.module(X), hf(pixel_values=X).logits, atol=1e-6)


def test_hf_directory_missing_config(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(EdgeVitError, match="no config.json"):
        load_model(HFSource(source="hf", path=tmp_path))


def test_saved_stage_is_a_source(tmp_path: Path) -> None:
    g = ModelGraph.from_module(SimpleViT(embed_dim=32, depth=2, num_heads=4).eval(),
                               {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 4}})
    g.keep_heads(1, [0, 3])
    g.save(tmp_path / "stage")
    again = load_model(SavedSource(source="edgevit", path=tmp_path / "stage"))
    assert again.spec.blocks[1].attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(again.module(X), g.module(X))


def test_torch_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model = SimpleViT(embed_dim=32, depth=1, num_heads=2)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    g = load_model(BuiltinSource(source="builtin", kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
                                 checkpoint=tmp_path / "ckpt.pth"))
    with torch.no_grad():
        assert torch.equal(g.module(X), model.eval()(X))


class Evil:
    def __reduce__(self):  # would run a command if unpickled
        return (print, ("unpickled!",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)  # torch.load's own protocol: no UserWarning
    with pytest.raises(EdgeVitError, match="refusing to unpickle") as err:
        read_state_dict(path)
    # one line that names what was refused, without torch's advice to load with weights_only=False
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value) and "\x1b" not in str(err.value)


def _spec():
    return ModelGraph.from_module(SimpleViT(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)).spec


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (20, 12, 12, 3), dtype=np.uint8),
             y_train=np.arange(20) % 4, x_val=rng.integers(0, 255, (8, 12, 12, 3), dtype=np.uint8),
             y_val=np.arange(8) % 4)
    data = build_data(NpzData(source="npz", path=tmp_path / "d.npz", batch_size=4), _spec(), seed=0)
    x, y = next(iter(data.val_loader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and data.num_classes == 4
    xs, ys = data.sample(4, seed=1)
    assert sorted(ys.tolist()) == [0, 1, 2, 3]  # class-stratified


def test_npz_single_channel_needs_to_rgb(tmp_path: Path) -> None:
    gray = np.zeros((4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x_train=gray, y_train=np.arange(4), x_val=gray, y_val=np.arange(4))
    with pytest.raises(EdgeVitError, match="not 3-channel RGB.*to_rgb"):
        build_data(NpzData(source="npz", path=tmp_path / "g.npz"), _spec(), seed=0)
    data = build_data(NpzData(source="npz", path=tmp_path / "g.npz", to_rgb=True), _spec(), seed=0)
    assert data.train[0][0].shape == (3, 16, 16)


def test_imagefolder_source(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (i * 40, 10, 200)).save(tmp_path / split / c / f"{i}.png")
    data = build_data(ImageFolderData(source="imagefolder", train=tmp_path / "train", val=tmp_path / "val"),
                      _spec(), seed=0)
    assert data.class_names == ["cat", "dog"] and len(data.train) == 6
    assert data.train[0][0].shape == (3, 16, 16)


def test_set_overrides_address_passes_by_name_and_index() -> None:
    data = tiny_recipe_data()
    apply_overrides(data, ["passes.adapt.epochs=7", "passes.1.export.opset=13", "data.limit_val=10",
                           "model.mean=[0.1, 0.2, 0.3]"])
    assert data["passes"][0]["adapt"]["epochs"] == 7 and data["passes"][1]["export"]["opset"] == 13
    assert data["data"]["limit_val"] == 10 and data["model"]["mean"] == [0.1, 0.2, 0.3]
    with pytest.raises(EdgeVitError, match="no pass 'adpt'.*did you mean 'adapt'"):
        apply_overrides(data, ["passes.adpt.epochs=1"])


def test_cli_passes_profiles_version() -> None:
    res = run_cli("passes")
    assert res.returncode == 0 and all(n in res.stdout for n in ("adapt", "export", "benchmark", "opset"))
    res = run_cli("profiles")
    assert res.returncode == 0 and "jetson-nano" in res.stdout and "fp16" in res.stdout
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("edgevit ")


def test_cli_inspect_stage_dir_and_onnx(tmp_path: Path) -> None:
    from edgevit.onnx_io import export_onnx

    g = ModelGraph.from_module(SimpleViT(embed_dim=32, depth=2, num_heads=4).eval(),
                               {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 4}})
    g.keep_mlp_units(0, range(20))
    g.save(tmp_path / "stage")
    res = run_cli("inspect", str(tmp_path / "stage"))
    assert res.returncode == 0, res.stderr
    assert f"{g.cost().macs / 1e6:.2f} M MACs" in res.stdout and "blocks.0.mlp.fc1" in res.stdout
    export_onnx(g, tmp_path / "m.onnx", opset=13)
    res = run_cli("inspect", str(tmp_path / "m.onnx"))
    assert res.returncode == 0, res.stderr
    assert "opset 13" in res.stdout and f"{g.cost().macs / 1e6:.2f} M MACs" in res.stdout


def test_cli_inspect_unknown_name() -> None:
    res = run_cli("inspect", "not_a_model_xyz")
    assert res.returncode == 2 and "timm has no model named" in res.stderr
