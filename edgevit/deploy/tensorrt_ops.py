"""Which ONNX operators each TensorRT version's ONNX parser (onnx-tensorrt) accepts, as data.

This answers "would TensorRT X.Y parse this exported graph?" offline, without TensorRT: compare the
op types of the standard ONNX domain against ``SUPPORTED_OPS`` (``unsupported``), and the model's
opset against ``MAX_OPSET``. It checks operator names only. Attribute/type restrictions are
listed in ``RESTRICTIONS`` for a human (or a later check) to read; they are not enforced here.

Source: the operator support matrix ``docs/operators.md`` of https://github.com/onnx/onnx-tensorrt,
one stored version per TensorRT release. Each version was read at the commit below, and the TensorRT
version it describes comes from the file's own header ("TensorRT X.Y supports operators up to
Opset N" / "... in the inclusive range of opset 9 to opset N"):

=======  ==========================================  =========  ==========================================
TRT      onnx/onnx-tensorrt commit                   max opset  note
=======  ==========================================  =========  ==========================================
8.2      078f20b8fbcbb802aa5ffcd2134519721a61b88c    13         header "TensorRT 8.2 ..."
8.4      009d6541b4ee1fa3f3150cd7cbabe7e56aa54840    13         header "TensorRT 8.4 ..."
8.5      6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc    17         header "TensorRT 8.5 ..." (see below)
8.6      66b2536545b89bf1388c8255a366cad14eff952a    17         header "TensorRT 8.6 ..."
9.1      877b5dccf5779d7d7dfa0c45b9c11cbee3b285ce    19         header "TensorRT 9.1 ..."
10.8     554c9f1b7fc048e39e3afe0c2af757902eb7b23e    22         opset range 9..22
10.12    4df1996807d844029e7aabefd54619af99f288f8    23         opset range 9..23
10.15    fa5aa9f61e7781d2ca8f5351d42c1f19525a6124    24         opset range 9..24
=======  ==========================================  =========  ==========================================

Caveats, stated plainly:

* The commits were identified by the header they carry, not by branch: the index used to read the
  repository does not say which branch a commit is on. So "8.2" is *a* commit whose doc says 8.2
  (the text matches what third-party notes quote from ``release/8.2-GA``); likewise for the others.
* Two different 8.5 docs exist. Commit 0f305925c58b7358ea5caa308b41faed803382a5 also says 8.5 but
  marks HardSwish, Mod and OneHot "N". The onnx-tensorrt Changelog's "8.5 GA" entry lists Mod as
  added, so that one is taken as pre-GA; 6d0ab7be (the superset) is used for "8.5".
* No stored doc for TensorRT 10.0-10.7 (and none for 9.0/9.2/9.3 at a known commit) was found.
  ``ops_for`` picks the nearest version *at or below*, so 10.0-10.7 resolve to "9.1": conservative
  (it may report ops as unsupported that 10.x parses, e.g. Hardmax since 9.2, DeformConv since 10.1,
  the window ops since 10.4, STFT since 10.5 -- per the Changelog), never the reverse.
* A row marked "Y [EXPERIMENTAL]" (NonMaxSuppression in 8.2/8.4) counts as supported.
* Ops that a doc does not list at all (e.g. LayerNormalization in 8.2/8.4, an opset-17 op) count as
  unsupported, the same as "N".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "RESTRICTIONS",
    "SOURCES",
    "SUPPORTED_OPS",
    "ops_for",
    "standard_op_types",
    "unsupported",
]

_REPO = "onnx/onnx-tensorrt"
_PATH = "docs/operators.md"

# TensorRT version -> (repository, path, commit) the data for that version was read from.
SOURCES: dict[str, tuple[str, str, str]] = {
    "8.2": (_REPO, _PATH, "078f20b8fbcbb802aa5ffcd2134519721a61b88c"),
    "8.4": (_REPO, _PATH, "009d6541b4ee1fa3f3150cd7cbabe7e56aa54840"),
    "8.5": (_REPO, _PATH, "6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc"),
    "8.6": (_REPO, _PATH, "66b2536545b89bf1388c8255a366cad14eff952a"),
    "9.1": (_REPO, _PATH, "877b5dccf5779d7d7dfa0c45b9c11cbee3b285ce"),
    "10.8": (_REPO, _PATH, "554c9f1b7fc048e39e3afe0c2af757902eb7b23e"),
    "10.12": (_REPO, _PATH, "4df1996807d844029e7aabefd54619af99f288f8"),
    "10.15": (_REPO, _PATH, "fa5aa9f61e7781d2ca8f5351d42c1f19525a6124"),
}


def _ops(names: str) -> frozenset[str]:
    return frozenset(names.split())


# Rows marked "Y" in the 8.2 doc (078f20b8).
_TRT_8_2 = _ops("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN
    LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean Min Mul Neg NonMaxSuppression Not Or
    Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomUniform RandomUniformLike Range
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
    Relu Reshape Resize ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where
""")
# Each later doc is the previous one plus these rows turning (or appearing as) "Y"; no op went from
# "Y" back to "N"/absent between the versions below.
_TRT_8_4 = _TRT_8_2 | _ops("Xor")
_TRT_8_5 = _TRT_8_4 | _ops("""
    GridSample HardSwish MeanVarianceNormalization Mod NonZero OneHot RandomNormal RandomNormalLike
    Reciprocal RoiAlign Shrink Trilu
""")  # LayerNormalization is listed, as "N"
_TRT_8_6 = _TRT_8_5 | _ops("GroupNormalization IsInf LayerNormalization")
_TRT_9_1 = _TRT_8_6 | _ops("CastLike")
_TRT_10_8 = _TRT_9_1 | _ops("BlackmanWindow DeformConv Gelu HammingWindow HannWindow Hardmax Mish STFT")
_TRT_10_12 = _TRT_10_8  # same op set; only types/restrictions changed
_TRT_10_15 = _TRT_10_12 | _ops("Attention RMSNormalization RotaryEmbedding TensorScatter")

# TensorRT "major.minor" -> ONNX op types (standard domain) marked supported ("Y") in that doc.
SUPPORTED_OPS: dict[str, frozenset[str]] = {
    "8.2": _TRT_8_2,
    "8.4": _TRT_8_4,
    "8.5": _TRT_8_5,
    "8.6": _TRT_8_6,
    "9.1": _TRT_9_1,
    "10.8": _TRT_10_8,
    "10.12": _TRT_10_12,
    "10.15": _TRT_10_15,
}

# Highest ONNX opset each doc's header names ("up to Opset N" / "inclusive range of opset 9 to opset N").
MAX_OPSET: dict[str, int] = {
    "8.2": 13,
    "8.4": 13,
    "8.5": 17,
    "8.6": 17,
    "9.1": 19,
    "10.8": 22,
    "10.12": 23,
    "10.15": 24,
}

# Lowest opset, where a header states one (the 10.x docs: "inclusive range of opset 9 to ...").
MIN_OPSET: dict[str, int] = {"10.8": 9, "10.12": 9, "10.15": 9}

# --- restrictions that matter for ViT / CNN exports --------------------------------------------------
# Short paraphrases of the doc's "Restrictions" / "Supported Types" columns and header notes; the key
# "*" holds the doc-wide data-type notes. Ops absent from a version's dict have no restriction there
# (or nothing relevant here). Per-axis Q/DQ is not mentioned in operators.md; where stated it comes
# from the onnx-tensorrt Changelog (docs/Changelog.md), and is marked so.

_RESIZE_8 = (
    "coordinate_transformation_mode: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, "
    "align_corners; mode: nearest, linear (so no cubic); nearest_mode: floor, ceil, round_prefer_floor, "
    "round_prefer_ceil. Types FP32, FP16."
)
_RESIZE_10 = (
    "coordinate_transformation_mode: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, "
    "align_corners; mode: nearest, linear (so no cubic); nearest_mode: floor, ceil, round_prefer_floor, "
    "round_prefer_ceil; keep_aspect_ratio_policy: stretch only; with tensor `scales`, `axes` must be an iota "
    "vector of length rank(input); antialias not supported. Types FP32, FP16, BF16."
)
_QDQ_PER_AXIS = "Per-axis scales supported since 8.0 (Changelog 8.0: 'Added support for per-axis quantization')."

_R_8_2: dict[str, str] = {
    "*": (
        "Data types: DOUBLE, FLOAT32, FLOAT16, INT8, BOOL. Limited INT32/INT64/DOUBLE support: INT64 is cast "
        "down to INT32 and DOUBLE to FLOAT, clamping to +-INT_MAX / +-FLT_MAX if necessary."
    ),
    "LayerNormalization": "Not listed (an opset-17 op; 8.2 parses up to opset 13): export at opset <= 16.",
    "Resize": _RESIZE_8,
    "Gather": "Types FP32, FP16, INT8, INT32 (negative indices natively supported since 8.2 EA, per Changelog).",
    "Slice": "`axes` must be an initializer.",
    "Squeeze": "`axes` must be an initializer.",
    "Unsqueeze": "`axes` must be a constant tensor.",
    "Split": "`split` must be an initializer.",
    "Einsum": "Ellipsis and diagonal operations are not supported. Types FP32, FP16.",
    "Cast": "Types FP32, FP16, INT32, INT8, BOOL (INT64 is cast down to INT32, see '*').",
    "Erf": "Types FP32, FP16 (no restriction listed).",
    "MatMul": "Types FP32, FP16 (no restriction listed); MatMulInteger is not supported.",
    "Softmax": "Types FP32, FP16 (no restriction listed).",
    "Conv": "2D or 3D convolutions only.",
    "ConvTranspose": "2D or 3D deconvolutions only. Weights `W` must be an initializer.",
    "AveragePool": "2D or 3D pooling only.",
    "Clip": "`min` and `max` clip values must be initializers.",
    "InstanceNormalization": "Scales `scale` and biases `B` must be initializers. Input rank must be >=3 & <=5.",
    "Range": "Floating point inputs only if `start`, `limit` and `delta` are initializers.",
    "CumSum": "`axis` must be an initializer.",
    "DequantizeLinear": f"`x_zero_point` must be zero. Types INT8. {_QDQ_PER_AXIS}",
    "QuantizeLinear": f"`y_zero_point` must be 0. Types FP32, FP16. {_QDQ_PER_AXIS}",
    "NonMaxSuppression": (
        "EXPERIMENTAL. `max_output_boxes_per_class`, `iou_threshold`, `score_threshold` must be initializers; "
        "output fixed-shape, padded to [max_output_boxes_per_class, 3]."
    ),
}
_R_8_4 = {
    **_R_8_2,
    "LayerNormalization": "Not listed (an opset-17 op; 8.4 parses up to opset 13): export at opset <= 16.",
    "Einsum": "Ellipsis and diagonal operations are not supported. Broadcasting between inputs is not supported.",
    "Conv": "2D or 3D convolutions only. Weights `W` must be an initializer.",
    "MaxPool": "2D or 3D pooling only. `Indices` output tensor unsupported.",
    "TopK": "`K` input must be an initializer.",
}
del _R_8_4["Clip"], _R_8_4["Split"]
_R_8_5 = {
    **_R_8_4,
    "LayerNormalization": "Listed as not supported (N): export at opset <= 16 so it is decomposed into primitive ops.",
    "Gather": "Types FP32, FP16, INT8, INT32, BOOL (no restriction listed).",
}
del _R_8_5["Conv"], _R_8_5["ConvTranspose"], _R_8_5["Range"], _R_8_5["NonMaxSuppression"]
_R_8_6 = {
    **_R_8_5,
    "*": (
        "Data types: DOUBLE, FLOAT32, FLOAT16, INT8, BOOL; limited DOUBLE support (cast down to FLOAT, clamped to "
        "+-FLT_MAX). Per-op tables list INT64, but the Changelog (9.0 EA) says only 9.0 stopped casting INT64 "
        "to INT32."
    ),
    "LayerNormalization": "Supported, types FP32, FP16 (no restriction listed).",
    "Gather": "Types FP32, FP16, INT8, INT32, INT64, BOOL (no restriction listed).",
    "Cast": "Types FP32, FP16, INT32, INT64, INT8, UINT8, BOOL.",
}
del _R_8_6["TopK"], _R_8_6["InstanceNormalization"]
_R_9_1 = {
    **_R_8_6,
    "*": (
        "Data types: DOUBLE, FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, FP8, INT8, UINT8, BOOL. DOUBLE is cast down "
        "to FLOAT. INT8/FP8 only through quantization from a higher precision. UINT8 only for network I/O."
    ),
    "LayerNormalization": "Supported, types FP32, FP16, BF16 (no restriction listed).",
    "Einsum": "Types FP32, FP16, BF16 (no restriction listed).",
    "Gather": "Types FP32, FP16, BF16, FP8, INT8, INT32, INT64, BOOL (no restriction listed).",
    "Cast": "Types FP32, FP16, BF16, INT32, INT64, FP8, INT8, UINT8, BOOL.",
    "Erf": "Types FP32, FP16, BF16 (no restriction listed).",
    "MatMul": "Types FP32, FP16, BF16, FP8, INT8 (no restriction listed); MatMulInteger is not supported.",
    "Softmax": "Types FP32, FP16, BF16, FP8, INT8 (no restriction listed).",
    "Resize": _RESIZE_8.replace("Types FP32, FP16.", "Types FP32, FP16, BF16."),
    "DequantizeLinear": f"`x_zero_point` must be zero. Types INT8, FP8. {_QDQ_PER_AXIS}",
    "QuantizeLinear": f"`y_zero_point` must be 0. Types FP32, FP16, BF16. {_QDQ_PER_AXIS}",
}
_R_10_8: dict[str, str] = {
    "*": (
        "Data types: DOUBLE, FLOAT32, FLOAT16, BFLOAT16, FP8, FP4, INT32, INT64, INT8, INT4, UINT8, BOOL. DOUBLE is "
        "cast down to FLOAT. INT8/INT4/FP8/FP4 are quantized types: only through quantization from a higher-"
        "precision float. UINT8 only for network I/O. Opsets 9..22."
    ),
    "LayerNormalization": "Only the first output `Y` is supported. Types FP32, FP16, BF16.",
    "Resize": _RESIZE_10,
    "Gather": "Types FP32, FP16, BF16, INT32, INT64, BOOL (no restriction listed).",
    "Slice": "No restriction listed (tensor `axes` supported since 10.3, per Changelog).",
    "Squeeze": "`axes` must be resolvable to a constant.",
    "Unsqueeze": "`axes` must be resolvable to a constant.",
    "Einsum": "Types FP32, FP16, BF16 (no restriction listed).",
    "Cast": "Types FP32, FP16, BF16, INT32, INT64, UINT8, BOOL.",
    "Erf": "Types FP32, FP16, BF16 (no restriction listed).",
    "Gelu": "Types FP32, FP16, BF16, INT8, INT32, INT64 (ONNX Gelu is opset 20+).",
    "MatMul": "Types FP32, FP16, BF16 (no restriction listed); MatMulInteger is not supported.",
    "Softmax": "Types FP32, FP16, BF16 (no restriction listed).",
    "AveragePool": "2D or 3D pooling only. `dilations` must be empty or all ones.",
    "MaxPool": "2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or all ones.",
    "ReduceMean": "`axes` must be an initializer.",
    "CumSum": "`axis` must be a build-time constant.",
    "TopK": "`sorted` must be 1. `K` input must be less than 3840.",
    "Dropout": "`is_training` must be an initializer and evaluate to False.",
    "Constant": "`sparse_value`, `value_string` and `value_strings` attributes are unsupported.",
    "GridSample": "Input must be 4D.",
    "ScatterND": "`reduction` is not supported.",
    "DequantizeLinear": f"`x_zero_point` must be zero. Types INT8, FP8, FP4, INT4. {_QDQ_PER_AXIS}",
    "QuantizeLinear": f"`y_zero_point` must be 0. Types FP32, FP16, BF16. {_QDQ_PER_AXIS}",
    "DynamicQuantizeLinear": "Not supported (compose IDynamicQuantize from ONNX ops as a model-local function).",
}
_R_10_12 = {
    **_R_10_8,
    "*": _R_10_8["*"].replace("Opsets 9..22.", "Opsets 9..23."),
    "ScatterND": "`reduction` other than `none` is not supported.",
}
_R_10_15 = {
    **_R_10_12,
    "*": _R_10_12["*"].replace("Opsets 9..23.", "Opsets 9..24."),
    "Attention": (
        "`Q`, `K`, `V` and `attn_mask` must be 4D; `past_key`/`past_value`/`nonpad_kv_seqlen` inputs and "
        "`present_key`/`present_value`/`qk_matmul_output` outputs unsupported; `qk_matmul_output_mode` and "
        "`softcap` unsupported; head counts come from dim 1 of `Q` and `K`/`V`."
    ),
}

# TensorRT "major.minor" -> {op type (or "*" for doc-wide notes): restriction}.
RESTRICTIONS: dict[str, dict[str, str]] = {
    "8.2": _R_8_2,
    "8.4": _R_8_4,
    "8.5": _R_8_5,
    "8.6": _R_8_6,
    "9.1": _R_9_1,
    "10.8": _R_10_8,
    "10.12": _R_10_12,
    "10.15": _R_10_15,
}

_VERSION_RE = re.compile(r"^\s*v?(\d+)(?:\.(\d+|x|\*))?(?:\.[0-9A-Za-z.+-]*)?\s*$", re.IGNORECASE)


def _key(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


_KNOWN: list[tuple[tuple[int, int], str]] = sorted((_key(k), k) for k in SUPPORTED_OPS)


def ops_for(version: str) -> tuple[str, frozenset[str]]:
    """The known op list nearest at or below ``version`` ("8.2", "8.2.1.8", "10.3", "10.x"), with the key used.

    "X.x" means the newest known X.*. Raises ValueError for an unparsable version or one below the earliest
    known ("8.2")."""
    m = _VERSION_RE.match(str(version))
    if not m:
        raise ValueError(f"not a TensorRT version: {version!r}")
    major = int(m.group(1))
    minor_s = m.group(2)
    if minor_s is not None and not minor_s.isdigit():  # "10.x": newest known 10.*
        same = [k for (maj, _), k in _KNOWN if maj == major]
        if not same:
            raise ValueError(f"no TensorRT {major}.x operator list known (known: {', '.join(SUPPORTED_OPS)})")
        return same[-1], SUPPORTED_OPS[same[-1]]
    wanted = (major, int(minor_s or 0))
    at_or_below = [k for v, k in _KNOWN if v <= wanted]
    if not at_or_below:
        raise ValueError(f"TensorRT {version} is older than the earliest known operator list ({_KNOWN[0][1]})")
    return at_or_below[-1], SUPPORTED_OPS[at_or_below[-1]]


def unsupported(op_types: Iterable[str], version: str) -> list[str]:
    """Sorted, de-duplicated op types (standard ONNX domain) that TensorRT ``version``'s parser does not list as
    supported. Pass only default-domain ops; ``standard_op_types`` collects them from a model."""
    _, ops = ops_for(version)
    return sorted({op for op in op_types if op not in ops})


def standard_op_types(model: Any) -> set[str]:
    """Op types of the standard ONNX domain ("" or "ai.onnx") in an ``onnx.ModelProto`` (or GraphProto),
    including nodes inside subgraphs (If/Loop/Scan bodies)."""
    graph = getattr(model, "graph", model)
    found: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            if node.domain in ("", "ai.onnx"):
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return found
