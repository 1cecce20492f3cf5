"""FP16 variants of the dense graphs: FP32 inputs/outputs, FP16 inside, fragile ops kept in FP32.

onnxconverter-common's convert_float_to_float16(keep_io_types=True) mis-types a graph output that
is also consumed inside the graph (here the FPN level maps, read by the RPN head and the extra
max-pool level): onnxruntime then refuses the model. So each graph output is first isolated
behind an Identity node; the converter then casts cleanly at the boundary."""
from __future__ import annotations

import warnings

import onnx
from onnx import helper

# Ops kept in FP32: the converter's defaults (non-neural ops, NMS, TopK, RoiAlign, Resize, Range,
# CumSum, Min, Max, Upsample) plus numerically fragile maths (exp/log/pow overflow or lose
# precision in FP16; reductions and softmax accumulate). Our graphs mostly hold Conv/Relu/Add/
# Gemm, which stay FP16 — that is where the time goes.
FRAGILE_OPS = ("Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax", "LogSoftmax",
               "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
               "LayerNormalization", "InstanceNormalization", "Erf")
INTERNAL_SUFFIX = "__fp32_out"


def isolate_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `model` where every graph output X is produced by Identity(X__fp32_out)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {o.name for o in out.graph.output}
    for node in out.graph.node:
        node.input[:] = [i + INTERNAL_SUFFIX if i in names else i for i in node.input]
        node.output[:] = [o + INTERNAL_SUFFIX if o in names else o for o in node.output]
    for o in out.graph.output:
        out.graph.node.append(helper.make_node("Identity", [o.name + INTERNAL_SUFFIX], [o.name],
                                               name=f"{o.name}_output"))
    return out


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FRAGILE_OPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": tiny weights
        converted = float16.convert_float_to_float16(isolate_outputs(model), keep_io_types=True,
                                                     op_block_list=block)
    # The converter leaves some intermediate value_info entries with their old FP32 type next to
    # the casts it inserts (seen on Resize); they are hints only, so drop them and re-infer.
    del converted.graph.value_info[:]
    converted = onnx.shape_inference.infer_shapes(converted)
    onnx.checker.check_model(converted)
    return converted
