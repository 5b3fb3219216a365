"""Static TensorRT compatibility of an ONNX file, checkable anywhere (no GPU, no tensorrt package).

Every node is checked against the operators the TensorRT 10 ONNX parser supports (the major version the [gpu]
extra pins; opsets 9 to 20), plus the attribute restrictions that commonly bite exported vision models. Nodes
of a custom domain need a TensorRT plugin. The table is compressor's own summary of the parser's published
support matrix for the ops vision models use; an op outside it is reported as unverified, not as supported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

TRT_MAJOR = 10
OPSET_RANGE = (9, 20)

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal
Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization Hardmax HardSigmoid HardSwish Identity If
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization
LpPool LRN MatMul Max MaxPool Mean Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence Round Scan ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())

UNSUPPORTED = frozenset("""
Bernoulli BitShift BlackmanWindow CenterCropPad Col2Im ConcatFromSequence ConvInteger Det DFT ImageDecoder DynamicQuantizeLinear MatMulInteger MaxRoiPool MaxUnpool
MeanVarianceNormalization Multinomial NegativeLogLikelihoodLoss QLinearConv QLinearMatMul RoiAlign SequenceAt
RegexFullMatch SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SoftmaxCrossEntropyLoss
SplitToSequence STFT StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

RESIZE_MODES = {"nearest", "linear"}
RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}


@dataclass
class Finding:
    node: str
    op: str
    domain: str
    level: str  # unsupported | restricted | unverified
    reason: str


@dataclass
class Compatibility:
    path: str
    opset: Optional[int]
    ops: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not any(f.level in ("unsupported", "restricted") for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "tensorrt_major": TRT_MAJOR, "opset": self.opset, "ops": self.ops,
                "compatible": self.compatible, "findings": [asdict(f) for f in self.findings]}


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _pool(node, attrs, consts) -> Optional[str]:
    if len(attrs.get("kernel_shape", [0, 0])) not in (2, 3):
        return "only 2D or 3D pooling is supported"
    if any(d != 1 for d in attrs.get("dilations", [])):
        return "dilations must be all ones"
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        return "the Indices output is not supported"
    return None


def _conv(node, attrs, consts) -> Optional[str]:
    if len(node.input) > 1 and node.input[1] not in consts:
        return "the weights must be an initializer (constant), not a computed tensor"
    if "kernel_shape" in attrs and len(attrs["kernel_shape"]) not in (2, 3):
        return "only 2D or 3D convolutions are supported"
    return None


def _resize(node, attrs, consts) -> Optional[str]:
    mode = _decode(attrs.get("mode", "nearest"))
    transform = _decode(attrs.get("coordinate_transformation_mode", "half_pixel"))
    if mode not in RESIZE_MODES:
        return f"mode {mode!r} (supported: nearest, linear)"
    if transform not in RESIZE_TRANSFORMS:
        return f"coordinate_transformation_mode {transform!r} is not supported"
    if attrs.get("antialias", 0):
        return "antialiasing is not supported"
    return None


def _axes_input(position: int) -> Callable:
    def check(node, attrs, consts) -> Optional[str]:
        if len(node.input) > position and node.input[position] and node.input[position] not in consts:
            return "the axes input must be an initializer (constant)"
        return None

    return check


def _topk(node, attrs, consts) -> Optional[str]:
    return None if attrs.get("sorted", 1) == 1 else "sorted must be 1"


def _layernorm(node, attrs, consts) -> Optional[str]:
    return "only the first output (Y) is supported" if len([o for o in node.output if o]) > 1 else None


RESTRICTIONS: dict[str, Callable] = {
    "MaxPool": _pool, "AveragePool": _pool, "Conv": _conv, "ConvTranspose": _conv, "Resize": _resize,
    "Slice": _axes_input(3), "Squeeze": _axes_input(1), "ReduceMean": _axes_input(1), "ReduceSum": _axes_input(1),
    "ReduceMax": _axes_input(1), "Pad": _axes_input(3), "TopK": _topk, "LayerNormalization": _layernorm,
}


def check_model(proto, path: str = "<model>") -> Compatibility:
    """Findings for every node of an onnx.ModelProto (subgraphs of If/Loop are not descended into)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    consts = {i.name for i in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    ops: dict[str, int] = {}
    report = Compatibility(path=path, opset=opset, ops=ops)
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        report.findings.append(Finding("(model)", "opset", "ai.onnx", "restricted",
                                       f"opset {opset} is outside the TensorRT {TRT_MAJOR} parser's range "
                                       f"{OPSET_RANGE[0]}-{OPSET_RANGE[1]}; export with export.onnx.opset 17"))
    for index, node in enumerate(proto.graph.node):
        domain = node.domain or "ai.onnx"
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        name = node.name or f"{node.op_type}_{index}"
        if domain not in ("ai.onnx",):
            report.findings.append(Finding(name, node.op_type, domain, "unsupported",
                                           f"custom-domain op ({domain}) needs a TensorRT plugin"))
        elif node.op_type in UNSUPPORTED:
            report.findings.append(Finding(name, node.op_type, domain, "unsupported",
                                           f"the TensorRT {TRT_MAJOR} ONNX parser has no {node.op_type}"))
        elif node.op_type not in SUPPORTED:
            report.findings.append(Finding(name, node.op_type, domain, "unverified",
                                           "not in compressor's TensorRT table; check the parser's support matrix"))
        elif node.op_type in RESTRICTIONS:
            problem = RESTRICTIONS[node.op_type](node, _attrs(node), consts)
            if problem:
                report.findings.append(Finding(name, node.op_type, domain, "restricted", problem))
    return report


def check_onnx(path: str | Path) -> Compatibility:
    """check_model of an ONNX file; a file that is missing or not an ONNX model is a CompressorError naming it."""
    import onnx  # noqa: F401 - needed here (load_onnx_proto returns None without it)

    from compressor.deploy.runners import load_onnx_proto

    return check_model(load_onnx_proto(path), str(path))
