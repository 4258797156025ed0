"""Hugging Face ``ViTForImageClassification`` (transformers 4.x and 5.x layouts).

transformers is imported only here, only when such a model is used (extra ``hf``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.graph.adapters.base import Adapter, BlockBranches, as_triple
from edgevit.graph.spec import AttentionSpec, BlockSpec, GraphSpec, MlpSpec
from edgevit.graph.trace import complete

HF_DEFAULT_MEAN = (0.5, 0.5, 0.5)
HF_DEFAULT_STD = (0.5, 0.5, 0.5)


class HFImageClassifier(nn.Module):
    """Wraps a Hugging Face classifier so that ``forward(pixels)`` returns the logits tensor,
    the contract every edgevit pass and the ONNX export rely on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise EdgeVitError(
            "model: Hugging Face models need transformers: pip install 'edgevit[hf]'"
        ) from e
    return transformers


def _layers(vit: nn.Module) -> tuple[str, nn.ModuleList]:
    if hasattr(vit, "layers"):
        return "model.vit.layers", vit.layers
    return "model.vit.encoder.layer", vit.encoder.layer


class HFViTAdapter(Adapter):
    name = "hf"
    supports = "Hugging Face ViTForImageClassification"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, HFImageClassifier) and type(module.model).__name__ == (
            "ViTForImageClassification"
        )

    def describe(self, module: nn.Module, mean: Any = None, std: Any = None) -> GraphSpec:
        cfg = module.model.config
        root, layers = _layers(module.model.vit)
        blocks = []
        for i, layer in enumerate(layers):
            p = f"{root}.{i}"
            a = layer.attention
            if hasattr(a, "q_proj"):  # transformers >= 5
                attn = AttentionSpec(
                    path=f"{p}.attention",
                    q=f"{p}.attention.q_proj",
                    k=f"{p}.attention.k_proj",
                    v=f"{p}.attention.v_proj",
                    proj=f"{p}.attention.o_proj",
                    num_heads=a.num_attention_heads,
                    head_dim=a.head_dim,
                )
                mlp = MlpSpec(
                    path=f"{p}.mlp", fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2", hidden=layer.mlp.fc1.out_features
                )
            else:  # transformers 4.x
                s = a.attention
                attn = AttentionSpec(
                    path=f"{p}.attention",
                    q=f"{p}.attention.attention.query",
                    k=f"{p}.attention.attention.key",
                    v=f"{p}.attention.attention.value",
                    proj=f"{p}.attention.output.dense",
                    num_heads=s.num_attention_heads,
                    head_dim=s.attention_head_size,
                )
                mlp = MlpSpec(
                    path=p,
                    fc1=f"{p}.intermediate.dense",
                    fc2=f"{p}.output.dense",
                    hidden=layer.intermediate.dense.out_features,
                )
            blocks.append(BlockSpec(index=i, path=p, attn=attn, mlp=mlp, norm1=f"{p}.layernorm_before",
                                    norm2=f"{p}.layernorm_after"))
        img = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size,) * 2
        patch = cfg.patch_size if isinstance(cfg.patch_size, (list, tuple)) else (cfg.patch_size,) * 2
        spec = GraphSpec(
            family=self.name,
            embed_dim=cfg.hidden_size,
            img_size=tuple(img),
            patch_size=tuple(patch),
            in_chans=cfg.num_channels,
            mean=as_triple(mean, HF_DEFAULT_MEAN),
            std=as_triple(std, HF_DEFAULT_STD),
            num_classes=cfg.num_labels,
            num_prefix_tokens=1,
            pool="token",
            patch_embed="model.vit.embeddings.patch_embeddings.projection",
            classifiers=["model.classifier"],
            blocks=blocks,
        )
        return complete(spec, module)

    def build(self, recipe: dict[str, Any]) -> nn.Module:
        transformers = require_transformers()
        config = transformers.ViTConfig.from_dict(recipe["config"])
        return HFImageClassifier(transformers.ViTForImageClassification(config))

    def after_keep_heads(self, attn: nn.Module, spec: AttentionSpec, channels: torch.Tensor) -> None:
        heads = int(channels.numel()) // spec.head_dim
        for m in (attn, getattr(attn, "attention", None)):
            if m is None:
                continue
            if hasattr(m, "num_attention_heads"):
                m.num_attention_heads = heads
            if hasattr(m, "all_head_size"):
                m.all_head_size = int(channels.numel())

    def block_branches(self, module: nn.Module, blk: BlockSpec) -> BlockBranches:
        layer = module.get_submodule(blk.path)
        if hasattr(layer, "mlp"):  # transformers >= 5: layer.mlp is the branch
            return BlockBranches(mlp=layer.mlp)
        # 4.x: ViTOutput adds the residual itself, so compose the branch from its parts
        return BlockBranches(mlp=lambda x: layer.output.dropout(layer.output.dense(layer.intermediate(x))))

    def keep_blocks(self, module: nn.Module, blocks: list[int]) -> None:
        root, layers = _layers(module.model.vit)
        parent_path, attr = root.rsplit(".", 1)
        parent = module.get_submodule(parent_path)
        kept = nn.ModuleList([layers[i] for i in blocks])
        for j, layer in enumerate(kept):  # HF layers carry their index for caches
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = j
        setattr(parent, attr, kept)
        module.model.config.num_hidden_layers = len(blocks)

    def reset_classifier(self, module: nn.Module, num_classes: int) -> None:
        old = module.model.classifier
        module.model.classifier = nn.Linear(old.in_features, num_classes)
        module.model.num_labels = num_classes
        module.model.config.num_labels = num_classes

    @contextmanager
    def export_mode(self, module: nn.Module) -> Iterator[None]:
        cfg = module.model.config
        saved = cfg._attn_implementation
        cfg._attn_implementation = "eager"  # explicit MatMul/Softmax, parseable at every opset
        try:
            yield
        finally:
            cfg._attn_implementation = saved
