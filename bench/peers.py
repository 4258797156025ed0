"""Peers benchmark: edgevit side by side with the tools users would pick instead.

Pruning: Torch-Pruning (group magnitude, group Taylor) against edgevit's OSSCAR on the
reference CIFAR-10 teacher (../shared/data) at the same ratios (50 % and 75 % of the MLP
hidden units, 50 % of the attention heads, in every block): top-1 right after pruning, the
pruned model's FLOPs and the seconds it took; then the best of each tool at MLP 50 % after
the same short recovery (same loop, same batches, same steps). INT8: ONNX Runtime's
quantize_static (its defaults), NNCF's post-training quantization of the ONNX model, NVIDIA
ModelOpt's ONNX PTQ and edgevit's INT8 (ort_cpu layout), all calibrated on the same train
images: top-1 on the teacher, and ONNX Runtime CPU latency at batch 1 on a DeiT-Tiny-shaped
timm model at 224 px (random weights, speed only) as a ratio to FP32 measured in the same run,
each model timed in its own process (python -m edgevit.latency). Not part of the test suite;
the peers come with pip install -e '.[bench]'.

    python bench/peers.py            # full size: 10,000 test images, 512 calibration images
    python bench/peers.py --quick    # a few minutes: 1,000 test images, fewer runs and steps
"""

# ---- by hand: what each tool needed beyond its one call (printed by the script) ----
# Torch-Pruning, MLP units (50 % / 75 %):
#  - ignored_layers: the classifier (model.head), patch_embed.proj and every attn.qkv. Without
#    patch_embed.proj the residual group (embed dim, norms, cls_token, pos_embed as "unwrapped
#    parameters") is pruned at the same ratio; without the qkv layers head dims go too.
#  - Taylor: a forward + backward pass (cross-entropy on the labels) over the calibration
#    images, written by hand before pruner.step(); gradients zeroed afterwards.
#  - the ratio is per group (fc1 out = fc2 in), so 384 units at 50 % keep 192 as edgevit's plan.
# Torch-Pruning, attention heads (50 %):
#  - num_heads={attn.qkv: 6 for every block}, prune_num_heads=True, prune_head_dims=False,
#    head_pruning_ratio=0.5; heads only go when the group's channel ratio is > 0, so
#    pruning_ratio=0.5 as well, with every mlp.fc1 (and head, patch_embed.proj) ignored so that
#    ratio touches nothing else.
#  - after pruning, for every timm Attention: num_heads = pruner.num_heads[attn.qkv] and
#    attn_dim = num_heads * head_dim (forward reshapes to attn_dim and fails otherwise).
#  - both: the pruned model is a bare nn.Module; FLOPs and the kept counts were read back here
#    (ModelGraph.from_module) to check they match edgevit's plan.
# edgevit (the same three results):
#  - counts = plan.counts_for(graph, PlanConfig(), heads, mlp); reconstruct.osscar_model(graph,
#    counts, calibration images, device) (in a recipe: prune: {method: osscar, mlp: 0.5}).
#    The graph spec knows which Linear is qkv / proj / fc1 / fc2, and keep_heads updates the
#    timm attributes (num_heads, attn_dim): nothing to ignore or reset.
# ONNX Runtime quantize_static (defaults: QDQ, every op type it supports, per-tensor, s8/s8, MinMax):
#  - a CalibrationDataReader class (get_next) written by hand; quant_pre_process run by hand
#    (ONNX Runtime recommends it before quantizing).
# NNCF (nncf.quantize on the onnx.ModelProto):
#  - an nncf.Dataset with a transform_fn mapping each item to {input name: array};
#    subset_size defaults to 300 images, set to the calibration size by hand;
#    model_type=nncf.ModelType.TRANSFORMER (NNCF's advice for transformers) set by hand; the
#    summary line's nncf figures are that run (NNCF's plain defaults are printed too).
# NVIDIA ModelOpt (modelopt.onnx.quantization.quantize):
#  - nvidia-modelopt[onnx] does not install next to onnx 1.23 / onnxruntime 1.32: the extra pins
#    onnx~=1.21 and onnxruntime-gpu~=1.24 (whose wheel overwrites the onnxruntime package);
#    installed by hand as the plain package plus the extra's other dependencies.
#  - it writes intermediate files next to the input model: run in a folder of its own.
#  - high_precision_dtype defaults to fp16 (the float part of the graph turns FP16, which this
#    CPU has no kernels for): high_precision_dtype="fp32" set by hand for ORT CPU.
# edgevit INT8:
#  - export_onnx, preprocess, quantize_int8(layout="ort_cpu", calibration_method="percentile",
#    nodes_to_exclude=activation_matmuls(...)) (in a recipe: quantize: {} on a CPU profile).
# Optimum (optimum-onnx 0.1.0: ORTOptimizer, ORTQuantizer):
#  - it needs transformers<4.58 (it imports internals 5.x removed); the bench venv keeps 5.x, so its
#    process gets transformers 4.57.6 + huggingface_hub 0.36.2 from a side folder
#    (EDGEVIT_OPTIMUM_SITE, made with pip install --no-deps --target).
#  - it reads a Hugging Face config.json beside the ONNX to choose its fusions: a ViTConfig with the
#    model's width, heads, depth and MLP width written by hand (the model is timm's).
#  - O3, its highest level that runs on CPU (O4 is FP16 for GPUs); it approximates GELU (FastGelu).
#  - its quantizer cannot type FastGelu's output: ORT's symbolic shape inference run by hand first.
#  - AutoQuantizationConfig.avx2(is_static=False, per_channel=False): this AMD EPYC (Zen 3) has AVX2
#    and no AVX-512 or VNNI (lscpu), so the avx512_vnni config targets instructions it lacks.
# OpenVINO 2026.4.1 (+ NNCF 3.4.0):
#  - ov.convert_model on the same ONNX; compile_model with PERFORMANCE_HINT LATENCY and
#    INFERENCE_NUM_THREADS (the thread count every ONNX Runtime model gets) set by hand.
#  - NNCF on the OpenVINO model: nncf.Dataset, subset_size, model_type TRANSFORMER by hand.
# edgevit CPU forms: the host profile's export (its CPU form) and quantize: {layout: ort_cpu_dynamic}.
# ---- end by hand ----

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SKIP, cifar_data, cifar_dirs, cifar_teacher  # noqa: E402

SETTINGS = (("mlp50", "mlp", 0.5), ("mlp75", "mlp", 0.75), ("heads50", "heads", 0.5))
TP_IMPORTANCES = ("magnitude", "taylor")


def by_hand() -> str:
    """The comment block at the top of this file, without the comment marks."""
    lines = Path(__file__).read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("# ---- by hand"))
    end = next(i for i, s in enumerate(lines) if s.startswith("# ---- end by hand"))
    return "\n".join(s[2:] for s in lines[start + 1:end])


@contextlib.contextmanager
def quiet():  # noqa: ANN201
    """Silence a peer's progress bars and logging (stdout and stderr) while it runs."""
    import logging

    out, err = io.StringIO(), io.StringIO()
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        logging.disable(level)


# ---- pruning ---------------------------------------------------------------------------

def tp_prune(module, what: str, ratio: float, importance: str, images, labels, device, batch: int = 32):  # noqa: ANN001, ANN201
    """Torch-Pruning on a copy of the timm ViT; returns (pruned module, seconds)."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    m = copy.deepcopy(module).to(device).eval()
    t0 = time.perf_counter()
    example = images[:1].to(device)
    imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    ignored = [m.head, m.patch_embed.proj]
    num_heads = {}
    for blk in m.blocks:
        if what == "mlp":
            ignored.append(blk.attn.qkv)
        else:
            ignored.append(blk.mlp.fc1)
            num_heads[blk.attn.qkv] = blk.attn.num_heads
    kw = (dict(pruning_ratio=ratio) if what == "mlp" else
          dict(pruning_ratio=ratio, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
               head_pruning_ratio=ratio))
    with warnings.catch_warnings():  # "unwrapped parameters cls_token, pos_embed": in the ignored residual group
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, ignored_layers=ignored, **kw)
    if importance == "taylor":
        m.zero_grad(set_to_none=True)
        for s in range(0, len(images), batch):
            F.cross_entropy(m(images[s:s + batch].to(device)), labels[s:s + batch].to(device)).backward()
    with torch.no_grad():
        pruner.step()
    m.zero_grad(set_to_none=True)
    if what == "heads":
        for blk in m.blocks:
            blk.attn.num_heads = pruner.num_heads[blk.attn.qkv]
            blk.attn.attn_dim = blk.attn.num_heads * blk.attn.head_dim
    return m.cpu().eval(), time.perf_counter() - t0


def ev_prune(graph, what: str, ratio: float, images, device):  # noqa: ANN001, ANN201
    """edgevit's OSSCAR at the plan's counts; returns (pruned graph, seconds)."""
    from edgevit.prune.plan import PlanConfig, counts_for
    from edgevit.prune.reconstruct import osscar_model

    g = graph.clone()
    counts = counts_for(g, PlanConfig(), ratio if what == "heads" else 0.0, ratio if what == "mlp" else 0.0)
    t0 = time.perf_counter()
    osscar_model(g, counts, images, device)
    g.module.cpu().eval()
    return g, time.perf_counter() - t0


def recover(module, teacher, loader, steps: int, lr: float, device) -> None:  # noqa: ANN001
    """The same plain loop for every tool: AdamW (linear warm-up over the first tenth of the
    steps, then cosine to zero), cross-entropy + KL to the unpruned teacher; same batches and
    same augmentation draws for every model."""
    import math

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    module.to(device).train()
    teacher.to(device).eval()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warm if i < warm else
                                              0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    done = 0
    while done < steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t = teacher(x)
            s = module(x)
            loss = F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1),
                                                    reduction="batchmean", log_target=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    module.cpu().eval()
    teacher.cpu()


def shape_of(graph) -> str:  # noqa: ANN001
    heads = sorted({b.attn.num_heads for b in graph.spec.blocks})
    units = sorted({b.mlp.hidden for b in graph.spec.blocks})
    return f"heads {'/'.join(map(str, heads))}, units {'/'.join(map(str, units))}"


def pruning(args, graph, data, device, t_top1: float) -> dict:  # noqa: ANN001
    from edgevit.graph import ModelGraph
    from edgevit.training import evaluate_top1

    images, labels = data.sample(args.calibration, 0, "train")
    base_flops = graph.cost().flops
    rows: dict[tuple[str, str], dict] = {}
    kept: dict[tuple[str, str], object] = {}
    for name, what, ratio in SETTINGS:
        for imp in TP_IMPORTANCES:
            m, secs = tp_prune(graph.module, what, ratio, imp, images, labels, device)
            g = ModelGraph.from_module(m, graph.build)
            top1 = evaluate_top1(m.to(device), data.val_loader(), device)
            m.cpu()
            rows[(name, f"tp {imp}")] = dict(top1=top1, flops=g.cost().flops, seconds=secs, shape=shape_of(g))
            kept[(name, f"tp {imp}")] = m
        g, secs = ev_prune(graph, what, ratio, images, device)
        top1 = evaluate_top1(g.module.to(device), data.val_loader(), device)
        g.module.cpu()
        rows[(name, "ev osscar")] = dict(top1=top1, flops=g.cost().flops, seconds=secs, shape=shape_of(g))
        kept[(name, "ev osscar")] = g.module
        for method in (*(f"tp {i}" for i in TP_IMPORTANCES), "ev osscar"):
            r = rows[(name, method)]
            print(f"  {name:<8} {method:<13} top-1 {r['top1']:6.2f}%  {r['flops'] / 1e6:7.1f} MFLOPs "
                  f"({r['flops'] / base_flops:.3f})  {r['seconds']:6.2f} s  [{r['shape']}]", file=sys.stderr)

    print(f"\nPruning the reference teacher ({base_flops / 1e6:.1f} MFLOPs), one-shot, no fine-tuning; "
          f"{args.calibration} calibration images from train, top-1 on {len(data.val)} test images:")
    print(f"  {'setting':<9}{'method':<25}{'top-1 %':>8}{'MFLOPs':>9}{'kept':>7}{'seconds':>9}  shape")
    for name, _, _ in SETTINGS:
        for method in (*(f"tp {i}" for i in TP_IMPORTANCES), "ev osscar"):
            r = rows[(name, method)]
            label = {"tp magnitude": "Torch-Pruning magnitude", "tp taylor": "Torch-Pruning taylor",
                     "ev osscar": "edgevit osscar"}[method]
            print(f"  {name:<9}{label:<25}{r['top1']:>8.2f}{r['flops'] / 1e6:>9.1f}{r['flops'] / base_flops:>7.3f}"
                  f"{r['seconds']:>9.2f}  {r['shape']}")

    best_tp = max(TP_IMPORTANCES, key=lambda i: rows[("mlp50", f"tp {i}")]["top1"])
    rec: dict[tuple[str, float], float] = {}
    if args.recover_steps > 0:
        loader = data.train_loader(seed=0, epoch=0)
        # The unpruned teacher goes through the same loop as a control: what the loop itself does
        # to a model that lost nothing.
        tp_key, ev_key = ("mlp50", f"tp {best_tp}"), ("mlp50", "ev osscar")
        start = {f"Torch-Pruning {best_tp}": (kept[tp_key], rows[tp_key]["top1"]),
                 "edgevit osscar": (kept[ev_key], rows[ev_key]["top1"]),
                 "unpruned teacher (control)": (graph.module, t_top1)}
        for lr in args.recover_lr:
            for label, (module, _) in start.items():
                m = copy.deepcopy(module)
                t0 = time.perf_counter()
                recover(m, graph.module, loader, args.recover_steps, lr, device)
                rec[(label, lr)] = evaluate_top1(m.to(device), data.val_loader(), device)
                print(f"  recovered {label} at lr {lr:g}: {rec[(label, lr)]:.2f}% ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr)
        print(f"\nMLP 50 %, after the same recovery ({args.recover_steps} steps of {data.batch_size} train "
              "images, AdamW, warm-up + cosine, cross-entropy + KL to the unpruned teacher), top-1 % at each peak lr:")
        print(f"  {'':<28}{'one-shot':>9}" + "".join(f"{f'lr {lr:g}':>11}" for lr in args.recover_lr))
        for label, (_, before) in start.items():
            print(f"  {label:<28}{before:>9.2f}" + "".join(f"{rec[(label, lr)]:>11.2f}" for lr in args.recover_lr))
    return {"rows": rows, "recovered": rec}


# ---- INT8 ------------------------------------------------------------------------------

class Reader:
    """ONNX Runtime's calibration-reader protocol, a batch at a time."""

    def __init__(self, images, name: str, batch: int = 32) -> None:  # noqa: ANN001
        self.chunks = iter([images[i:i + batch] for i in range(0, len(images), batch)])
        self.name = name

    def get_next(self):  # noqa: ANN201
        b = next(self.chunks, None)
        return None if b is None else {self.name: b}


def ort_default(src: Path, dst: Path, calib) -> None:  # noqa: ANN001
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    with quiet():
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(calib, "input"))
    pre.unlink()


def nncf_ptq(src: Path, dst: Path, calib, transformer: bool) -> None:  # noqa: ANN001
    import nncf
    import onnx

    ds = nncf.Dataset(list(calib[:, None]), lambda x: {"input": x})
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with quiet():
        q = nncf.quantize(onnx.load(str(src)), ds, subset_size=len(calib), **kw)
    onnx.save(q, str(dst))


def modelopt_ptq(src: Path, dst: Path, calib, high: str) -> None:  # noqa: ANN001
    """ModelOpt's ONNX INT8 PTQ (its default calibration, entropy) in a folder of its own."""
    import shutil

    from modelopt.onnx.quantization import quantize

    work = Path(tempfile.mkdtemp(prefix="edgevit-modelopt-"))
    shutil.copy(src, work / src.name)
    try:
        with quiet():
            quantize(str(work / src.name), quantize_mode="int8", calibration_data={"input": calib},
                     high_precision_dtype=high, output_path=str(dst), log_level="ERROR")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def edgevit_int8(src: Path, dst: Path, calib) -> None:  # noqa: ANN001
    """What the quantize pass does on a CPU profile: ort_cpu layout, percentile calibration,
    attention's activation x activation MatMuls left in float."""
    from edgevit.quantize.int8 import activation_matmuls, preprocess, quantize_int8

    pre = dst.with_suffix(".pre.onnx")
    preprocess(src, pre)
    with quiet():
        quantize_int8(pre, dst, calib, calibration_method="percentile", layout="ort_cpu",
                      nodes_to_exclude=activation_matmuls(pre))
    pre.unlink()


def ev_fused(src: Path, dst: Path, calib, attention: bool = True) -> None:  # noqa: ANN001
    """What the export pass hands on for the host profile: its CPU form (``attention``:
    export's cpu_attention, attention as ORT's Attention kernel)."""
    from edgevit.ort_fusion import fuse_for_cpu

    fuse_for_cpu(src, dst, calib[:4], attention=attention)


def ev_dynamic(src: Path, dst: Path, calib, fused: bool = False, attention: bool = True) -> None:  # noqa: ANN001
    """quantize: {layout: ort_cpu_dynamic}, on the plain export or on the CPU form."""
    from edgevit.quantize.int8 import activation_matmuls, preprocess, quantize_dynamic_int8

    mid = dst.with_suffix(".fused.onnx")
    if fused:
        ev_fused(src, mid, calib, attention)
        src = mid
    pre = dst.with_suffix(".pre.onnx")
    preprocess(src, pre)
    with quiet():
        quantize_dynamic_int8(pre, dst, ["MatMul", "Attention"] if fused and attention else ["MatMul"],
                              nodes_to_exclude=activation_matmuls(pre))
    pre.unlink()
    mid.unlink(missing_ok=True)


def ev_fused_static(src: Path, dst: Path, calib) -> None:  # noqa: ANN001
    """The host profile's default INT8 (ort_cpu) on the fused form: the linears around Attention."""
    mid = dst.with_suffix(".fused.onnx")
    ev_fused(src, mid, calib)
    edgevit_int8(mid, dst, calib)
    mid.unlink()


def _optimum_dir(src: Path, work: Path) -> Path:
    """Optimum reads a Hugging Face config.json next to the ONNX file: a ViT one, by hand."""
    from transformers import ViTConfig

    spec = json.loads(src.with_suffix(".spec.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    ViTConfig(hidden_size=spec["embed_dim"], num_attention_heads=spec["heads"], num_hidden_layers=spec["depth"],
              intermediate_size=spec["mlp_hidden"], image_size=spec["img_size"]).save_pretrained(work)
    (work / "model.onnx").write_bytes(src.read_bytes())
    return work


def optimum_form(src: Path, dst: Path, calib, level: str, int8: bool) -> None:  # noqa: ANN001
    """Optimum's ORTOptimizer at ``level``, then (``int8``) its ORTQuantizer with the AVX2 config."""
    import shutil

    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    work = _optimum_dir(src, Path(tempfile.mkdtemp(prefix="edgevit-optimum-")))
    try:
        with quiet():
            ORTOptimizer.from_pretrained(work, file_names=["model.onnx"]).optimize(
                save_dir=work / "opt", optimization_config=getattr(AutoOptimizationConfig, level)())
            out = work / "opt" / "model_optimized.onnx"
            if int8:
                typed = SymbolicShapeInference.infer_shapes(onnx.load(str(out)), auto_merge=True)
                onnx.save(typed, str(out))  # by hand: its quantizer cannot type FastGelu's output otherwise
                ORTQuantizer.from_pretrained(work / "opt", file_name=out.name).quantize(
                    save_dir=work / "q", quantization_config=AutoQuantizationConfig.avx2(is_static=False,
                                                                                          per_channel=False))
                out = work / "q" / "model_optimized_quantized.onnx"
        shutil.copy(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def openvino_fp32(src: Path, dst: Path, calib) -> None:  # noqa: ANN001
    import openvino as ov

    ov.save_model(ov.convert_model(str(src)), str(dst.with_suffix(".xml")))
    dst.write_text(dst.with_suffix(".xml").name)  # a pointer: the OpenVINO model is the .xml/.bin pair


def openvino_nncf(src: Path, dst: Path, calib) -> None:  # noqa: ANN001
    """NNCF's INT8 on the OpenVINO model of the same ONNX (model_type TRANSFORMER, its advice)."""
    import nncf
    import openvino as ov

    ds = nncf.Dataset(list(calib[:, None]), lambda x: x)
    with quiet():
        q = nncf.quantize(ov.convert_model(str(src)), ds, subset_size=len(calib),
                          model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(q, str(dst.with_suffix(".xml")))
    dst.write_text(dst.with_suffix(".xml").name)


QUANTIZERS = {  # name: (label, function, runtime); every one in a process of its own
    "ort": ("ONNX Runtime quantize_static, defaults", ort_default, "ort"),
    "nncf": ("NNCF, model_type TRANSFORMER", lambda s, d, c: nncf_ptq(s, d, c, True), "ort"),
    "nncf_default": ("NNCF, defaults", lambda s, d, c: nncf_ptq(s, d, c, False), "ort"),
    "modelopt": ("ModelOpt, high precision fp32", lambda s, d, c: modelopt_ptq(s, d, c, "fp32"), "ort"),
    "modelopt_fp16": ("ModelOpt, defaults (fp16)", lambda s, d, c: modelopt_ptq(s, d, c, "fp16"), "ort"),
    "ev": ("edgevit ort_cpu", edgevit_int8, "ort"),
    # CPU deployment forms (the host profile) and the CPU peers
    "ev_fused": ("edgevit CPU form, FP32", ev_fused, "ort"),
    "ev_dynamic": ("edgevit ort_cpu_dynamic (plain export)", ev_dynamic, "ort"),
    "ev_fused_static": ("edgevit CPU form + ort_cpu", ev_fused_static, "ort"),
    "ev_fused_dynamic": ("edgevit CPU form + ort_cpu_dynamic", lambda s, d, c: ev_dynamic(s, d, c, True), "ort"),
    "ev_noattention_dynamic": ("edgevit CPU form, no Attention, + dynamic",
                               lambda s, d, c: ev_dynamic(s, d, c, True, False), "ort"),
    "optimum_o2": ("Optimum ORTOptimizer O2", lambda s, d, c: optimum_form(s, d, c, "O2", False), "ort"),
    "optimum_o3": ("Optimum ORTOptimizer O3", lambda s, d, c: optimum_form(s, d, c, "O3", False), "ort"),
    "optimum_o3_int8": ("Optimum O3 + ORTQuantizer avx2 dynamic",
                        lambda s, d, c: optimum_form(s, d, c, "O3", True), "ort"),
    "openvino": ("OpenVINO FP32 (same ONNX)", openvino_fp32, "ov"),
    "openvino_nncf": ("OpenVINO + NNCF INT8 TRANSFORMER", openvino_nncf, "ov"),
}
GROUPS = {"ev_cpu": ("ev", "ev_fused", "ev_dynamic", "ev_fused_static", "ev_fused_dynamic",
                    "ev_noattention_dynamic"),
          "optimum": ("optimum_o2", "optimum_o3", "optimum_o3_int8"), "openvino": ("openvino", "openvino_nncf")}
INT8_KEYS = {"ort", "nncf", "nncf_default", "modelopt", "modelopt_fp16", "ev", "ev_dynamic", "ev_fused_static",
             "ev_fused_dynamic", "ev_noattention_dynamic", "optimum_o3_int8", "openvino_nncf"}


def quantize_apart(key: str, src: Path, dst: Path, calib_npy: Path) -> str | None:
    """One quantizer in a fresh process (ModelOpt patches ONNX Runtime's calibrators in the
    process it runs in, which then breaks quantize_static for everyone after it). Returns
    None, or the error the quantizer raised."""
    env = dict(os.environ)
    site = os.environ.get("EDGEVIT_OPTIMUM_SITE")
    if key.startswith("optimum") and site:  # Optimum's own transformers pin, for its process only
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, __file__, "--quantize-one", key, str(src), str(dst), str(calib_npy)],
                         capture_output=True, text=True, cwd=REPO, env=env)
    if res.returncode == 0 and dst.is_file():
        return None
    lines = [s for s in (res.stdout + res.stderr).splitlines() if s.startswith("quantize-one failed: ")]
    return lines[-1].removeprefix("quantize-one failed: ") if lines else (res.stderr.strip().splitlines() or ["?"])[-1]


def quantize_one(key: str, src: str, dst: str, calib_npy: str) -> int:
    import numpy as np

    try:
        QUANTIZERS[key][1](Path(src), Path(dst), np.load(calib_npy))
    except Exception as e:  # noqa: BLE001 - reported by the parent, one line
        msg = str(e).strip().splitlines()
        print(f"quantize-one failed: {type(e).__name__}: {msg[0] if msg else ''}")
        return 1
    return 0


def latency(path: Path, runs: int, warmup: int, threads: int = 0, runtime: str = "ort") -> float:
    """Median ms at batch 1, in a fresh process (python -m edgevit.latency; OpenVINO: this
    script's --ov-latency)."""
    cmd = ([sys.executable, "-m", "edgevit.latency", str(path), "--batch", "1"] if runtime == "ort" else
           [sys.executable, __file__, "--ov-latency", str(path)])
    res = subprocess.run([*cmd, "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])["median_ms"]


def _ov_compiled(path: Path, threads: int):  # noqa: ANN202
    import openvino as ov

    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    return core.compile_model(str(path.parent / path.read_text().strip()), "CPU", cfg)


def ov_latency(path: str, runs: int, warmup: int, threads: int) -> dict:
    """OpenVINO's CPU plugin at batch 1, latency hint (the same loop as edgevit.latency)."""
    import numpy as np

    compiled = _ov_compiled(Path(path), threads)
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for _ in range(warmup):
        req.infer({0: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        req.infer({0: x})
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": float(np.median(times)), "runs": runs}


def ov_predictions(path: Path, loader) -> np.ndarray:  # noqa: ANN001, F821
    import numpy as np

    compiled = _ov_compiled(path, 0)
    return np.concatenate([compiled({0: x.numpy()})[0].argmax(-1) for x, _ in loader])


def gemm_throughput(threads: int, size: int = 1024, reps: int = 20) -> dict:
    """The machine's plain-GEMM limit through ONNX Runtime, best of ``reps``: FP32 MatMul and
    u8 x s8 MatMulInteger (7-bit weights, as edgevit quantizes on this kind of CPU), GOP/s."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for kind in ("fp32", "int8"):
        int8 = kind == "int8"
        w = (rng.integers(-64, 64, (size, size), dtype=np.int8) if int8 else
             rng.standard_normal((size, size)).astype(np.float32))
        a = rng.integers(0, 255, (size, size), dtype=np.uint8) if int8 else w.astype(np.float32)
        node = helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "w"], ["y"])
        g = helper.make_graph([node], "gemm", [helper.make_tensor_value_info(
            "a", TensorProto.UINT8 if int8 else TensorProto.FLOAT, [size, size])],
            [helper.make_tensor_value_info("y", TensorProto.INT32 if int8 else TensorProto.FLOAT, [size, size])],
            [numpy_helper.from_array(w, "w")])
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), so, providers=["CPUExecutionProvider"])
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, {"a": a})
            best = min(best, time.perf_counter() - t0)
        out[f"{kind}_gops"] = 2 * size**3 / best / 1e9
    return out


def gemm_apart(threads: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--gemm", "--threads", str(threads)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


def int8_nodes(path: Path) -> str:
    from edgevit.onnx_io import op_counts
    from edgevit.quantize.int8 import quantized_nodes

    ops = op_counts(path)
    dynamic = ops.get("MatMulInteger", 0) + ops.get("QAttention", 0)  # dynamic INT8: quantized at run time
    if dynamic:
        return f"{dynamic} MatMulInteger/QAttention, {ops.get('DynamicQuantizeLinear', 0)} DynamicQuantizeLinear"
    return f"{len(quantized_nodes(path))} MatMul/Gemm/Conv in INT8, {ops.get('QuantizeLinear', 0)} QuantizeLinear"


def int8(args, graph, data, tmp: Path) -> dict:  # noqa: ANN001
    import numpy as np
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from edgevit.graph import ModelGraph
    from edgevit.onnx_io import export_onnx, predictions, session

    failed: dict[str, str] = {}
    acc: dict[str, float] = {}
    keys = [k for k in QUANTIZERS if not args.forms or k in args.forms]
    np.save(tmp / "cifar.calib.npy", data.sample(args.calibration, 0, "train")[0].numpy())
    export_onnx(graph, tmp / "cifar.onnx", opset=17)
    write_spec(graph, tmp / "cifar.onnx")
    labels, ref = predictions(session(tmp / "cifar.onnx", args.latency_threads), data.val_loader())
    acc["fp32"], agree = 100.0 * float((ref == labels).mean()), {"fp32": 100.0}
    for key in keys:
        label, _, runtime = QUANTIZERS[key]
        out = tmp / f"cifar.{key}.onnx"
        why = quantize_apart(key, tmp / "cifar.onnx", out, tmp / "cifar.calib.npy")
        if why is not None:
            failed[key] = why
            print(f"  int8 {label}: failed: {why}", file=sys.stderr)
            continue
        pred = (predictions(session(out, args.latency_threads), data.val_loader())[1] if runtime == "ort" else
                ov_predictions(out, data.val_loader()))
        acc[key], agree[key] = 100.0 * float((pred == labels).mean()), 100.0 * float((pred == ref).mean())
        print(f"  int8 {label:<40} top-1 {acc[key]:6.2f}%  same class as FP32 {agree[key]:6.2f}%  "
              f"({int8_nodes(out) if runtime == 'ort' else 'OpenVINO IR'})", file=sys.stderr)

    torch.manual_seed(0)
    kw = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=1000)
    deit = ModelGraph.from_module(VisionTransformer(**kw).eval(), {"architecture": "VisionTransformer", "kwargs": kw})
    export_onnx(deit, tmp / "deit.onnx", opset=17)
    write_spec(deit, tmp / "deit.onnx")
    np.save(tmp / "deit.calib.npy",
            np.random.default_rng(0).standard_normal((args.deit_calibration, 3, 224, 224)).astype(np.float32))
    nodes: dict[str, str] = {}
    models = {"fp32": tmp / "deit.onnx"}
    for key in keys:
        label = QUANTIZERS[key][0]
        if key in failed:
            continue
        out = tmp / f"deit.{key}.onnx"
        why = quantize_apart(key, tmp / "deit.onnx", out, tmp / "deit.calib.npy")
        if why is not None:
            failed[key] = f"{why} (DeiT shape)"
            print(f"  int8 {label} (DeiT): failed: {why}", file=sys.stderr)
            continue
        models[key] = out
        nodes[key] = int8_nodes(out) if QUANTIZERS[key][2] == "ort" else "OpenVINO IR"
    # Rounds interleave the models, so a slow spell on the machine hits all of them alike; each
    # figure is the median over rounds of each round's median, with the spread of the ratio.
    rounds: dict[str, list[float]] = {k: [] for k in models}
    gemm: dict[str, float] = {}
    for r in range(args.repeat):
        for key, path in models.items():
            runtime = "ort" if key == "fp32" else QUANTIZERS[key][2]
            rounds[key].append(latency(path, args.runs, args.warmup, args.latency_threads, runtime))
        for k, v in gemm_apart(args.latency_threads).items():  # the machine's limit, in the same rounds
            gemm[k] = max(gemm.get(k, 0.0), v)
        print(f"  latency round {r + 1}/{args.repeat}: " + " ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items()),
              file=sys.stderr)
    lat = {k: statistics.median(v) for k, v in rounds.items()}
    ratios = {k: [f / q for f, q in zip(rounds["fp32"], v, strict=True)] for k, v in rounds.items()}
    spread = {k: (min(r), max(r)) for k, r in ratios.items()}

    print(f"\nINT8: top-1 % of the reference teacher on {len(data.val)} test images (ONNX Runtime CPU; =FP32: "
          "images given the FP32 model's class), "
          f"{args.calibration} calibration images from train; latency: DeiT-Tiny shape (12x192, 224 px), batch 1, "
          f"median of {args.runs} runs after {args.warmup} warm-up, each model in its own process "
          f"({os.cpu_count()} cores, {args.latency_threads or 'default'} thread(s) per model), {args.repeat} "
          "interleaved rounds (median; speed-up range over rounds):")
    print(f"  {'':<40}{'top-1 %':>8}{'=FP32 %':>8}{'ms':>9}{'speed-up':>10}{'range':>12}  DeiT graph")
    print(f"  {'FP32':<40}{acc['fp32']:>8.2f}{100.0:>8.2f}{lat['fp32']:>9.2f}{1.0:>10.2f}")
    for key in keys:
        label = QUANTIZERS[key][0]
        if key in failed:
            continue
        lo, hi = spread[key]
        print(f"  {label:<40}{acc[key]:>8.2f}{agree[key]:>8.2f}{lat[key]:>9.2f}{lat['fp32'] / lat[key]:>10.2f}"
              f"{f'{lo:.2f}-{hi:.2f}':>12}  {nodes[key]}")
    for key, why in failed.items():
        print(f"  {QUANTIZERS[key][0]}: not measured: {why}")
    macs = deit.cost().macs
    best = {}
    print(f"\nFastest form of each tool on the DeiT-Tiny shape ({macs / 1e9:.3f} GMACs) against this machine's "
          f"plain {1024}^3 GEMM through ONNX Runtime ({args.latency_threads or 'default'} thread(s), best of the "
          f"rounds): FP32 {gemm['fp32_gops']:.1f} GFLOP/s, INT8 {gemm['int8_gops']:.1f} GOP/s:")
    for group, members in GROUPS.items():
        done = [k for k in members if k in lat]
        if not done:
            continue
        k = min(done, key=lat.__getitem__)
        reached = 2 * macs / (lat[k] / 1e3) / 1e9
        limit = gemm["int8_gops"] if k in INT8_KEYS else gemm["fp32_gops"]
        best[group] = lat["fp32"] / lat[k]
        print(f"  {group:<9}{QUANTIZERS[k][0]:<42}{lat[k]:>8.2f} ms  x{best[group]:.2f}  top-1 {acc[k]:.2f}% "
              f"(FP32 {acc['fp32']:.2f}%)  {reached:.1f} GOP/s = {100 * reached / limit:.0f} % of the "
              f"{'INT8' if k in INT8_KEYS else 'FP32'} GEMM")
    return {"top1": acc, "latency": lat, "failed": failed, "best": best, "gemm": gemm}


def write_spec(graph, path: Path) -> None:  # noqa: ANN001
    """The shape facts a peer needs by hand (Optimum's config.json), next to the ONNX file."""
    b = graph.spec.blocks[0]
    path.with_suffix(".spec.json").write_text(json.dumps({
        "embed_dim": graph.spec.embed_dim, "heads": b.attn.num_heads, "depth": len(graph.spec.blocks),
        "mlp_hidden": b.mlp.hidden, "img_size": graph.spec.img_size[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 test images, 128 calibration images, 20 latency "
                    "runs, 10 recovery steps: a few minutes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calibration", type=int, default=None, help="calibration images, train split (default 512)")
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default all 10,000)")
    ap.add_argument("--runs", type=int, default=None, help="latency runs per model (default 100)")
    ap.add_argument("--warmup", type=int, default=None, help="latency warm-up runs (default 20)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved latency rounds (default 3)")
    ap.add_argument("--deit-calibration", type=int, default=None, help="random calibration images for the DeiT "
                    "shape (speed only; default 32)")
    ap.add_argument("--recover-steps", type=int, default=None, help="recovery steps (default 100)")
    ap.add_argument("--recover-batch", type=int, default=64)
    ap.add_argument("--recover-lr", type=float, nargs="+", default=[5e-5, 2e-5], help="peak learning rates, "
                    "each a recovery of its own")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 keeps the "
                    "pruning seconds meaningful when other jobs share the cores (2 threads on 2 busy cores ran "
                    "OSSCAR 20x slower here)")
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--latency-threads", type=int, default=1, help="threads per timed model (0: the runtime's "
                    "default); 1 because the 2 cores here are shared: a 2-thread session ran 5.7x slower than a "
                    "1-thread one while other jobs ran (README)")
    ap.add_argument("--forms", nargs="+", default=None, help="only these INT8 / CPU forms: " + ", ".join(QUANTIZERS))
    ap.add_argument("--quantize-one", nargs=4, metavar=("KEY", "SRC", "DST", "CALIB"), help=argparse.SUPPRESS)
    ap.add_argument("--ov-latency", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quantize_one:
        sys.exit(quantize_one(*args.quantize_one))
    if args.ov_latency or args.gemm:
        print(json.dumps(ov_latency(args.ov_latency, args.runs or 100, args.warmup or 20, args.threads)
                         if args.ov_latency else gemm_throughput(args.threads)))
        return
    q = args.quick
    for name, full, quick in (("calibration", 512, 128), ("test_limit", None, 1000), ("runs", 100, 20),
                              ("warmup", 20, 5), ("repeat", 3, 1), ("deit_calibration", 32, 8),
                              ("recover_steps", 100, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from edgevit.context import resolve_device
    from edgevit.data import build_data
    from edgevit.models.sources import load_model
    from edgevit.recipe import Recipe
    from edgevit.training import evaluate_top1

    dirs, model = cifar_dirs(), cifar_teacher()
    if dirs is None or model is None:
        print(f"peers: skipped: {SKIP}")
        return
    data_cfg = cifar_data(dirs, batch_size=args.recover_batch, **({"limit_val": args.test_limit}
                                                                    if args.test_limit else {}))
    rec = Recipe.model_validate({"name": "bench-peers", "seed": 0, "model": model, "data": data_cfg})
    graph = load_model(rec.model)
    data = build_data(rec.data, graph.spec, 0)
    device = resolve_device(args.device)
    t_top1 = evaluate_top1(graph.module.to(device), data.val_loader(), device)
    graph.module.cpu().eval()
    print(f"teacher: top-1 {t_top1:.2f}% on {len(data.val)} test images, {graph.cost().flops / 1e6:.1f} MFLOPs"
          + ("  (--quick)" if q else ""))
    tmp = Path(tempfile.mkdtemp(prefix="edgevit-bench-peers-"))

    try:
        pr = pruning(args, graph, data, device, t_top1) if not args.skip_prune else None
        qr = int8(args, graph, data, tmp) if not args.skip_int8 else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # every form of two models: hundreds of MB

    print("\nBy hand (what each tool needed beyond its one call):")
    print(by_hand())
    print(f"\ntook {time.perf_counter() - t_start:.0f} s")

    def f(x: float | None) -> str:
        return "nan" if x is None else f"{x:.2f}"

    parts = []
    rows = pr["rows"] if pr else {}
    for name, _, _ in SETTINGS:
        tp = max(rows[(name, f"tp {i}")]["top1"] for i in TP_IMPORTANCES) if rows else None
        parts += [f"tp_{name}_top1={f(tp)}", f"ev_{name}_top1={f(rows[(name, 'ev osscar')]['top1'] if rows else None)}"]
    acc, lat = (qr["top1"], qr["latency"]) if qr else ({}, {})
    for key in ("ort", "nncf", "ev"):
        parts.append(f"{key}_int8_top1={f(acc.get(key))}")
    for key in ("ort", "nncf", "ev"):
        parts.append(f"{key}_int8_speedup={f(lat['fp32'] / lat[key] if key in lat else None)}")
    best = qr["best"] if qr else {}
    parts += [f"{g}_best_speedup={f(best.get(g))}" for g in GROUPS]
    print("peers: " + " ".join(parts))


if __name__ == "__main__":
    main()
