#!/usr/bin/env python3
"""edgevit's Jetson-side benchmark: measure a deploy bundle on the board itself.

Runs on the board's own Python (JetPack 4.6: Python 3.6, TensorRT 8.2, pycuda) with only
the standard library, numpy, tensorrt and pycuda. It never imports edgevit.

    python3 edgevit_jetson_bench.py BUNDLE_DIR [--out measured.json] [--runs 200] [--warmup 50]

A bundle directory holds ``bundle.json``::

    {"format": "edgevit.bundle/1", "stage": "04-export", "model": "model.onnx",
     "precision": "fp16", "workspace_mb": 512,
     "input": {"name": "input", "shape": [1, 3, 32, 32]},
     "validation": "val.npz"}          # x: float32 N,C,H,W already normalised; y: int labels

It builds a TensorRT engine from the ONNX on the device (engines are not portable), caches
it next to the bundle, warms up, times batch-1 inference with CUDA events, measures
throughput and top-1 on the bundled validation images, samples power and RAM from
``tegrastats`` when present, and writes JSON in the shape of edgevit's report.json
(``stages: [{stage, top1, latency_ms: {median, p90, p99}, throughput_ips, peak_mem_mb,
power_mw}]`` plus ``device``) so ``edgevit report`` can set it beside the prediction.

A segmentation bundle (``"task": "segmentation"``, ``num_classes``, ``ignore_index``) ships
``val.npz`` with ``y``: masks at their own resolution padded with the ignore label to one
(N, Hmax, Wmax) array and ``mask_hw``: each mask's (h, w). The script scores mIoU the way
edgevit does on the host (``edgevit.seg.metrics``): the engine's logits at the input size are
upsampled bilinearly (align_corners=False, as torch) to each mask's size in numpy, the argmax
is taken there, and one confusion matrix over all frames gives the IoUs; a class absent from
both truth and prediction is left out of the mean. It writes ``miou`` and ``pixel_accuracy``
(0-100) instead of ``top1``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

FORMAT_IN = "edgevit.bundle/1"
FORMAT_OUT = "edgevit.measured/1"


def percentiles(times_ms):
    """median, p90, p99 of a list of milliseconds."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99))}


_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
_POWER = re.compile(r"(POM_5V_IN|VDD_IN) (\d+)(?:mW)?/(\d+)")


def parse_tegrastats(line):
    """(ram_used_mb, power_mw) from one tegrastats line; None where absent."""
    ram = _RAM.search(line)
    power = _POWER.search(line)
    return (int(ram.group(1)) if ram else None, int(power.group(2)) if power else None)


class Tegrastats:
    """Samples tegrastats in the background while the benchmark runs (if it exists)."""

    def __init__(self, interval_ms=100):
        self.ram, self.power = [], []
        self.proc = None
        try:
            self.proc = subprocess.Popen(["tegrastats", "--interval", str(interval_ms)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         universal_newlines=True)
        except OSError:
            return
        self.thread = threading.Thread(target=self._read)
        self.thread.daemon = True
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            ram, power = parse_tegrastats(line)
            if ram is not None:
                self.ram.append(ram)
            if power is not None:
                self.power.append(power)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        out = {}
        if self.power:
            out["power_mw"] = {"mean": float(np.mean(self.power)), "max": float(max(self.power))}
        if self.ram:
            out["peak_mem_mb"] = float(max(self.ram))
        return out


def _read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def device_info(trt_version):
    release = _read_text("/etc/nv_tegra_release")
    l4t = None
    if release:
        m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release)
        l4t = f"R{m.group(1)}.{m.group(2)}" if m else release.splitlines()[0]
    mode = None
    try:
        out = subprocess.check_output(["nvpmodel", "-q"], stderr=subprocess.DEVNULL, universal_newlines=True)
        m = re.search(r"NV Power Mode: (\S+)", out)
        mode = m.group(1) if m else out.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    model = _read_text("/proc/device-tree/model")
    return {"model": model.rstrip("\x00") if model else None, "l4t": l4t, "tensorrt": trt_version,
            "power_mode": mode, "python": sys.version.split()[0]}


def load_bundle(directory):
    path = os.path.join(directory, "bundle.json")
    if not os.path.isfile(path):
        raise SystemExit("error: {} has no bundle.json; pass the bundle directory edgevit wrote "
                         "(runs/<name>/NN-bundle/bundle)".format(directory))
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_IN:
        raise SystemExit("error: {} is not an edgevit bundle (format {!r})".format(directory, meta.get("format")))
    return meta


def build_engine(trt, onnx_path, precision, shape, workspace_mb, timing_cache=None, calibrator=None,
                 max_batch=32):
    """Serialized engine for the ONNX at ``onnx_path`` (TensorRT 8.2 ... 10.x).

    ``precision`` fp32/fp16/int8: int8 uses the model's own Q/DQ nodes when it has them,
    else ``calibrator`` (implicit INT8, TensorRT < 10). ``timing_cache``: a file that keeps
    kernel timings between builds, so a rebuild on the same board takes seconds."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise SystemExit("error: TensorRT cannot parse {}: {}".format(onnx_path, errors))
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    else:  # TensorRT 8.2 (JetPack 4.6)
        config.max_workspace_size = workspace_mb << 20
    if precision in ("fp16", "int8") and getattr(builder, "platform_has_fast_fp16", True):
        config.set_flag(trt.BuilderFlag.FP16)
        if not keep_norms_fp32(trt, network, config):
            print("warning: no LayerNorm layers found to keep in FP32 (no 'norm' in any layer name); "
                  "FP16 LayerNorm can overflow", file=sys.stderr)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrator is not None:
            config.int8_calibrator = calibrator
    cache = None
    if timing_cache is not None:
        blob = b""
        if os.path.isfile(timing_cache):
            with open(timing_cache, "rb") as f:
                blob = f.read()
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    inp = network.get_input(0)
    if any(d < 0 for d in inp.shape):  # dynamic batch: optimise for the shapes we run
        profile = builder.create_optimization_profile()
        top = (max(max_batch, shape[0]),) + tuple(shape[1:])
        profile.set_shape(inp.name, tuple(shape), tuple(shape), top)
        config.add_optimization_profile(profile)
        if calibrator is not None:
            config.set_calibration_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise SystemExit("error: the engine build failed (often: out of memory on a 4 GB board)")
    if cache is not None:
        with open(timing_cache + ".tmp", "wb") as f:
            f.write(memoryview(cache.serialize()))
        os.replace(timing_cache + ".tmp", timing_cache)
    return bytes(blob)


def keep_norms_fp32(trt, network, config):
    """Run decomposed LayerNorm (ReduceMean, Sub, Pow, Sqrt, Div under a ``norm`` scope) in FP32:
    its sum of squares overflows FP16 on real activations. Returns how many layers were pinned."""
    kinds = {trt.LayerType.REDUCE, trt.LayerType.ELEMENTWISE, trt.LayerType.UNARY}
    if hasattr(trt.LayerType, "NORMALIZATION"):  # TensorRT >= 8.6 imports LayerNormalization whole
        kinds.add(trt.LayerType.NORMALIZATION)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds and "norm" in layer.name.lower():
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
    if pinned:
        flag = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None)  # TensorRT >= 8.4
        config.set_flag(flag if flag is not None else trt.BuilderFlag.STRICT_TYPES)  # 8.2
    return pinned


class Runner:
    """One execution context with pinned host buffers and device buffers, reshaped per batch.

    TensorRT 10 removed bindings: it addresses tensors by name (``set_input_shape``,
    ``set_tensor_address``, ``execute_async_v3``); 8.x uses binding indices
    (``set_binding_shape``, ``execute_async_v2``). One context serves every batch size, since a
    second context cannot take the engine's only optimisation profile on 8.x."""

    def __init__(self, trt, cuda, engine):
        self.cuda = cuda
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise SystemExit("error: TensorRT could not create an execution context (out of GPU memory?)")
        self.v3 = hasattr(engine, "num_io_tensors")
        if self.v3:
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outs = [n for n in names if n not in self.ins]
        self.stream = cuda.Stream()
        self.shape = None

    def engine_batch(self):
        """The engine's fixed batch size, or None when the batch axis is dynamic."""
        dims = self.engine.get_tensor_shape(self.ins[0]) if self.v3 else self.engine.get_binding_shape(0)
        return None if dims[0] < 0 else int(dims[0])

    def bind(self, shape):
        """Set the input shape and (re)allocate buffers for it."""
        shape = tuple(shape)
        ok = self.context.set_input_shape(self.ins[0], shape) if self.v3 else self.context.set_binding_shape(0, shape)
        if ok is False:
            raise SystemExit("error: the engine does not accept input shape {}".format(shape))
        out_shape = tuple(self.context.get_tensor_shape(self.outs[0]) if self.v3 else self.context.get_binding_shape(1))
        self.h_in = self.cuda.pagelocked_empty(shape, dtype=np.float32)
        self.h_out = self.cuda.pagelocked_empty(out_shape, dtype=np.float32)
        self.d_in = self.cuda.mem_alloc(self.h_in.nbytes)
        self.d_out = self.cuda.mem_alloc(self.h_out.nbytes)
        if self.v3:
            self.context.set_tensor_address(self.ins[0], int(self.d_in))
            self.context.set_tensor_address(self.outs[0], int(self.d_out))
        self.shape = shape
        return self

    def _enqueue(self):
        if self.v3:
            ok = self.context.execute_async_v3(self.stream.handle)
        else:
            ok = self.context.execute_async_v2([int(self.d_in), int(self.d_out)], self.stream.handle)
        if ok is False:
            raise SystemExit("error: TensorRT failed to run the engine at input shape {}".format(self.shape))

    def __call__(self, x):
        np.copyto(self.h_in, x)
        self.cuda.memcpy_htod_async(self.d_in, self.h_in, self.stream)
        self._enqueue()
        self.cuda.memcpy_dtoh_async(self.h_out, self.d_out, self.stream)
        self.stream.synchronize()
        return self.h_out.copy()

    def time_ms(self):
        """One inference timed on the GPU with CUDA events (host copies excluded)."""
        start, end = self.cuda.Event(), self.cuda.Event()
        start.record(self.stream)
        self._enqueue()
        end.record(self.stream)
        end.synchronize()
        return start.time_till(end)

    def time_with_copies_ms(self, x):
        """One inference timed on the host, copies in and out included (what an application sees)."""
        t0 = time.perf_counter()
        self(x)
        return (time.perf_counter() - t0) * 1000.0


def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of torch's bilinear resize along one axis (align_corners=False)."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    scale = float(n_in) / float(n_out)
    for d in range(n_out):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        frac = src - i0
        m[d, i0] += 1.0 - frac
        m[d, i1] += frac
    return m


def upsample_logits(logits, size):
    """(C, h, w) logits at ``size`` (H, W), bilinearly as the host metric does."""
    h, w = logits.shape[-2:]
    if (h, w) == tuple(size):
        return logits
    rows, cols = bilinear_matrix(h, size[0]), bilinear_matrix(w, size[1])
    return np.matmul(rows[None], np.matmul(logits.astype(np.float32), cols.T))


def confusion(pred, mask, num_classes, ignore_index):
    """(C, C) counts, rows true class, columns predicted; the ignore label and labels >= C dropped."""
    t = mask.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    p = np.clip(p[keep], 0, num_classes - 1)
    return np.bincount(t[keep] * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def seg_scores(cm):
    """(mIoU, pixel accuracy, per-class IoU or None) in 0-100 from a confusion matrix."""
    cm = cm.astype(np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    miou = float(iou[present].mean() * 100) if present.any() else 0.0
    total = cm.sum()
    acc = float(inter.sum() / total * 100) if total > 0 else 0.0
    return miou, acc, [float(v * 100) if ok else None for v, ok in zip(iou, present)]  # noqa: B905 (3.6)


def score_segmentation(outputs, masks, mask_hw, num_classes, ignore_index):
    """mIoU etc. of per-frame logits (each (1, C, h, w) or (C, h, w)) against padded masks."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for out, mask, (mh, mw) in zip(outputs, masks, mask_hw):  # noqa: B905 (no strict= in 3.6)
        logits = out.reshape(out.shape[-3:])
        pred = upsample_logits(logits, (int(mh), int(mw))).argmax(0)
        cm += confusion(pred, mask[:int(mh), :int(mw)], num_classes, ignore_index)
    miou, acc, iou = seg_scores(cm)
    return {"miou": miou, "pixel_accuracy": acc, "iou": iou, "frames": len(mask_hw)}


def sha256_file(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Measure an edgevit deploy bundle on a Jetson.")
    ap.add_argument("bundle")
    ap.add_argument("--out", default=None, help="default: BUNDLE/measured.json")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--throughput-batch", type=int, default=8)
    args = ap.parse_args(argv)

    meta = load_bundle(args.bundle)
    import pycuda.autoinit  # noqa: F401  (CUDA context)
    import pycuda.driver as cuda
    import tensorrt as trt

    shape = [1] + list(meta["input"]["shape"][1:])
    model_path = os.path.join(args.bundle, meta["model"])
    # the engine's name carries the model's hash: a new bundle copied over an old one rebuilds
    engine_path = os.path.join(args.bundle, "model.{}.{}.trt{}.engine".format(
        sha256_file(model_path)[:12], meta["precision"], trt.__version__))
    if not os.path.isfile(engine_path):
        blob = build_engine(trt, model_path, meta["precision"], shape, meta.get("workspace_mb", 512),
                            timing_cache=os.path.join(args.bundle, "timing.cache"), max_batch=args.throughput_batch)
        with open(engine_path + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(engine_path + ".tmp", engine_path)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(engine_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise SystemExit("error: {} does not deserialize with TensorRT {}; delete it to rebuild".format(
            engine_path, trt.__version__))

    stats = Tegrastats()
    run = Runner(trt, cuda, engine).bind(shape)
    x0 = np.zeros(shape, dtype=np.float32)
    for _ in range(args.warmup):
        run.time_ms()
    times = [run.time_ms() for _ in range(args.runs)]
    with_copies = [run.time_with_copies_ms(x0) for _ in range(min(args.runs, 100))]
    fixed = run.engine_batch()
    tp_batch = fixed if fixed is not None else args.throughput_batch  # a batch-1 engine: throughput at 1
    run.bind([tp_batch] + shape[1:])
    for _ in range(5):
        run.time_ms()
    t0 = time.time()
    for _ in range(20):
        run.time_ms()
    throughput = 20 * tp_batch / (time.time() - t0)
    run.bind(shape)
    top1, scores = None, {}
    if meta.get("validation"):
        data = np.load(os.path.join(args.bundle, meta["validation"]), allow_pickle=False)
        x, y = data["x"].astype(np.float32), data["y"]
        if meta.get("task") == "segmentation":
            outs = (run(x[i:i + 1]) for i in range(len(x)))
            seg = score_segmentation(outs, y, data["mask_hw"], int(meta["num_classes"]), meta.get("ignore_index"))
            scores = {"task": "segmentation", "miou": seg["miou"], "pixel_accuracy": seg["pixel_accuracy"],
                      "iou": seg["iou"], "val_frames": seg["frames"]}
        else:
            correct = sum(int(run(x[i:i + 1]).argmax()) == int(y[i]) for i in range(len(y)))
            top1 = 100.0 * correct / max(len(y), 1)
    sampled = stats.stop()
    stage = dict({"stage": meta.get("stage"), "precision": meta["precision"], "top1": top1},
                 **scores)
    stage.update({"latency_ms": percentiles(times), "latency_with_copies_ms": percentiles(with_copies),
                  "throughput_ips": throughput, "throughput_batch": tp_batch,
                  "runs": args.runs, "warmup": args.warmup})
    stage.update(sampled)
    result = {"format": FORMAT_OUT, "device": device_info(trt.__version__), "stages": [stage]}
    out = args.out or os.path.join(args.bundle, "measured.json")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)
    quality = ("mIoU {:.2f}".format(scores["miou"]) if "miou" in scores else
               "top-1 {}".format("n/a" if top1 is None else f"{top1:.2f}%"))
    print("{}: median {:.2f} ms, p99 {:.2f} ms, {:.0f} img/s, {}".format(
        meta.get("stage"), stage["latency_ms"]["median"], stage["latency_ms"]["p99"], throughput, quality))
    return 0


if __name__ == "__main__":
    sys.exit(main())
