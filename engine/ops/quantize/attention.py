"""Static int8 on graphs with attention (BERT, MiniLM, ViT, ...): what is quantized there.

onnxruntime's `quantize_static` quantizes every operator it has a QDQ rule for, inputs and
outputs. On all-MiniLM-L6-v2 (held-out prose, cosine of the sentence embedding to fp32) that
plain call reads 0.31-0.35, and the parts that break it were found one operator type at a time:

* the Add that puts the attention mask on the scores, and the Softmax after it (alone: 0.34,
  0.44): the mask adds float32's lowest value (or -10000 in older exports), so one int8 scale
  over [-3.4e38, 45] rounds every real score to zero and attention becomes uniform;
* LayerNormalization and the residual Adds before it (alone: 0.92): the residual stream has a
  few channels 30x the rest (ranges up to 223 where most values are within ±2), so a per-tensor
  scale zeroes the small channels (Bondarenko et al., *Understanding and Overcoming the
  Challenges of Efficient Transformer Quantization*, 2021);
* the outputs of the weight MatMuls (alone with their inputs and weights: 0.94): the FFN's
  down-projection writes [-3, 195], and QDQ quantizes that output too (scale 0.78).

Weights and the weight layers' inputs are what int8 pays off on: with only those (per-channel
weights, the MatMul outputs left float, which onnxruntime runs as MatMulIntegerToFloat, the
kernel dynamic int8 uses) the same model reads 0.990. So on a graph with attention a static
build quantizes the weight layers (MatMul/Gemm/Conv with a constant weight: weights and
inputs, not the MatMul/Gemm outputs) and the embedding tables (Gather from a constant), and
keeps every other node float. This is also what QAT's torch simulation quantizes
(engine.ops.quantize.qat: Linear weights and inputs), so its training and the ONNX build agree.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.onnxgraph.graph import WEIGHT_INPUT, WEIGHT_OPS

if TYPE_CHECKING:
    import onnx

# Between the scores MatMul and the Softmax: scaling, the mask, casts and reshapes.
SCORE_PATH = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Where",
    "Cast",
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Identity",
}
# Outputs onnxruntime's QDQ quantizer should not quantize in such graphs (inputs and weights
# still are): left float, DequantizeLinear → MatMul runs as MatMulIntegerToFloat on CPU.
FLOAT_OUTPUT_OPS = ["MatMul", "Gemm"]


@dataclass(frozen=True)
class AttentionPlan:
    """What a static build quantizes in a graph with attention, and what it keeps float."""

    softmaxes: list[str]  # the attention Softmax nodes found
    quantized: list[str]  # weight layers and embedding Gathers
    kept_float: list[str]  # every other node
    op_types: dict[str, dict[str, int]]  # {"quantized": {op: n}, "kept_float": {op: n}}

    def as_dict(self) -> dict[str, Any]:
        return {
            "attention_softmaxes": len(self.softmaxes),
            "quantized": self.op_types["quantized"],
            "kept_float": self.op_types["kept_float"],
            "outputs_kept_float": FLOAT_OUTPUT_OPS,
            "why": (
                "a graph with attention: only the weight layers (weights and inputs) and the "
                "embedding tables are int8; the attention mask's Add and the Softmax, "
                "LayerNormalization and the residual Adds, and the weight MatMuls' outputs "
                "hold ranges one int8 scale per tensor cannot (masks of -3.4e38, outlier "
                "channels), so they stay float"
            ),
        }


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def attention_softmaxes(model: onnx.ModelProto) -> list[str]:
    """Softmax nodes fed (through scaling, mask and reshape ops) by a MatMul of two
    activations: the attention probabilities of a transformer."""
    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "Softmax" or not node.input:
            continue
        todo, seen = [node.input[0]], set()
        while todo:
            src = producer.get(todo.pop())
            if src is None or src.name in seen:
                continue
            seen.add(src.name)
            if src.op_type == "MatMul" and not any(i in consts for i in src.input):
                found.append(node.name)
                break
            if src.op_type in SCORE_PATH:
                todo += [i for i in src.input if i not in consts]
    return found


def attention_plan(model: onnx.ModelProto) -> AttentionPlan | None:
    """The static-int8 plan for a graph with attention; None for graphs without."""
    softmaxes = attention_softmaxes(model)
    if not softmaxes:
        return None
    consts = _constants(model)
    quantized: list[onnx.NodeProto] = []
    kept: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        weight = len(node.input) > WEIGHT_INPUT and node.input[WEIGHT_INPUT] in consts
        table = node.op_type == "Gather" and bool(node.input) and node.input[0] in consts
        (quantized if (node.op_type in WEIGHT_OPS and weight) or table else kept).append(node)
    by_type = {
        "quantized": dict(sorted(Counter(n.op_type for n in quantized).items())),
        "kept_float": dict(sorted(Counter(n.op_type for n in kept).items())),
    }
    return AttentionPlan(softmaxes, [n.name for n in quantized], [n.name for n in kept], by_type)
