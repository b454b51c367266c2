"""Mixed-range tensors: where one int8 scale cannot hold two ranges, keep that quantizer float.

A Concat that joins a 0..320 pixel box with 0..1 class scores, or an output whose channels
span ranges a hundred times apart, gets one activation scale from a static quantizer: the small
part falls below one int8 step and is zeroed, while the whole-output SQNR still looks fine.
Keeping just those few nodes float costs no weight bytes (a Concat has no weights) and keeps
every weight layer int8; each repair is listed with its measured ranges in details.repairs.

Ranges come from the calibration (per tensor) and from the float model's outputs on the job's
samples (per output channel), never from names or op patterns alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.onnxgraph.metrics import output_slices

if TYPE_CHECKING:
    import onnx

# Parts whose largest magnitudes differ by this factor lose >= 4 of int8's 8 bits in the
# smaller part: a shared scale is not good enough there.
MIXED_RANGE_RATIO = 16.0
# Ops that only move or reshape data: ORT's QDQ quantizer carries their input's scale through
# them, so a mixed-range tensor stays mixed-range on their far side.
PASS_THROUGH = {
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Split",
    "Gather",
    "Expand",
}


@dataclass(frozen=True)
class Repair:
    """One node kept float, and why (measured)."""

    node: str
    op_type: str
    tensor: str
    reason: str
    ranges: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "tensor": self.tensor,
            "action": "kept float",
            "reason": self.reason,
            "ranges": self.ranges,
        }


def _ratio(amax: Sequence[float]) -> float:
    positive = [a for a in amax if a > 0]
    if len(positive) < 2:
        return 1.0
    return max(positive) / min(positive)


def _constant_amax(model: onnx.ModelProto) -> dict[str, float]:
    from onnx import numpy_helper

    out = {
        t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
        for t in model.graph.initializer
    }
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            out[node.output[0]] = float(np.abs(value).max(initial=0.0))
    return out


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float tensors the graph declares (after shape inference), so shape
    arithmetic (int64 Concat of dims) is never taken for activations."""
    import onnx

    kinds = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    graph = model.graph
    declared = [*graph.input, *graph.value_info, *graph.output]
    return {v.name for v in declared if v.type.tensor_type.elem_type in kinds}


def mixed_range_concats(
    model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]
) -> list[Repair]:
    """Concat nodes whose inputs' calibrated magnitudes differ by MIXED_RANGE_RATIO or more,
    with the pass-through ops after them that would carry the one shared scale on."""
    consts = _constant_amax(model)
    floats = float_tensors(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    repairs: list[Repair] = []
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] not in floats:
            continue
        amax: dict[str, float] = {}
        for name in node.input:
            if name in ranges:
                lo, hi = ranges[name]
                amax[name] = max(abs(lo), abs(hi))
            elif name in consts:
                amax[name] = consts[name]
        if len(amax) < 2 or _ratio(list(amax.values())) < MIXED_RANGE_RATIO:
            continue
        shown = {k: round(v, 6) for k, v in amax.items()}
        ratio = _ratio(list(amax.values()))
        repairs.append(
            Repair(
                node.name,
                node.op_type,
                node.output[0],
                f"its inputs' ranges differ {ratio:.0f}× (|max| per input): one int8 scale "
                "would round the smaller inputs to a few steps",
                shown,
            )
        )
        repairs += _carried(node.output[0], consumers, node.name)
    return repairs


def _carried(tensor: str, consumers: dict[str, list[Any]], origin: str) -> list[Repair]:
    out: list[Repair] = []
    todo = [tensor]
    while todo:
        name = todo.pop()
        for node in consumers.get(name, []):
            if node.op_type in PASS_THROUGH and node.input[0] == name:
                out.append(
                    Repair(
                        node.name,
                        node.op_type,
                        node.output[0],
                        f"it passes on the mixed-range output of {origin}",
                        {},
                    )
                )
                todo += list(node.output)
    return out


def mixed_range_outputs(
    model: onnx.ModelProto, reference: Sequence[np.ndarray], already: set[str]
) -> list[Repair]:
    """Graph outputs whose channels (axis 1) span MIXED_RANGE_RATIO or more in the float
    model's outputs: the node that writes the output (through pass-through ops) is kept float
    when it has no weights (a weight layer there is left to the target's fallback)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer}
    repairs: list[Repair] = []
    for graph_output, ref in zip(model.graph.output, reference, strict=False):
        arr = np.asarray(ref)
        if not output_slices(arr.shape):
            continue
        axes = (0, *range(2, arr.ndim))
        amax = np.abs(arr).max(axis=axes)
        ratio = _ratio([float(a) for a in amax])
        if ratio < MIXED_RANGE_RATIO:
            continue
        chain = []
        node = producer.get(graph_output.name)
        while node is not None and node.op_type in PASS_THROUGH:
            chain.append(node)
            node = producer.get(node.input[0])
        if node is None or node.name in already:
            continue
        if any(i in weights for i in node.input):
            continue
        reason = (
            f"its channels' ranges differ {ratio:.0f}× (|max| per channel {float(amax.min()):.4g}"
            f"..{float(amax.max()):.4g}): one int8 scale would zero the small channels"
        )
        for n in [node, *chain]:
            repairs.append(
                Repair(n.name, n.op_type, n.output[0], reason, {"ratio": round(ratio, 2)})
            )
    return repairs


def output_tails(model: onnx.ModelProto, already: set[str]) -> list[Repair]:
    """The weightless nodes between the last weight layers and each graph output (a detector's
    box decode and score Sigmoid, a classifier's Softmax, a map's Sigmoid), kept float.

    Int8 there stores no weights and multiplies nothing, but its activation scale is set by the
    tensor's largest value: outputs whose values sit far below their maximum (detection scores
    of 1e-5..0.1, probability maps) lose most of their values to zero. Float costs a few
    elementwise ops on the output."""
    from engine.onnxgraph.graph import WEIGHT_OPS

    weights = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    floats = float_tensors(model)
    found: list[Repair] = []
    seen: set[str] = set()
    for graph_output in model.graph.output:
        todo = [graph_output.name]
        while todo:
            node = producer.get(todo.pop())
            if node is None or node.name in seen:
                continue
            weighted = node.op_type in WEIGHT_OPS or node.op_type == "ConvTranspose"
            if weighted and any(i in weights for i in node.input[1:2]):
                continue
            if node.op_type == "Gather" and node.input[:1] and node.input[0] in weights:
                # an embedding table is a weight layer: a transformer's residual stream runs
                # weightless from its embeddings to a pooled output, and the walk kept the
                # 30522×384 word table of all-MiniLM-L6-v2 float (2.7× the file)
                continue
            seen.add(node.name)
            todo += [i for i in node.input if i in floats]
            if node.name in already:
                continue
            found.append(
                Repair(
                    node.name,
                    node.op_type,
                    node.output[0],
                    f"a weightless node between the last weight layers and output "
                    f"{graph_output.name!r}: int8 here saves no weight bytes, and one scale "
                    "per tensor zeroes the values far below the tensor's maximum",
                    {},
                )
            )
    return found
