"""What several ops need to know about an ONNX graph: node names and order, which
initializers are layer weights (with their channel axes), and exclude-pattern matching."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
WEIGHT_INPUT = 1  # the weight is input 1 of Conv, Gemm and MatMul
BIAS_INPUT = {"Conv": 2, "Gemm": 2}


# ----------------------------------------------------------------------------- nodes


def strip_debug_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop per-node debug metadata (exporter stack traces with the exporting machine's paths)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return model


def sort_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order the graph's nodes topologically (some converters append nodes out of order)."""
    graph = model.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            return model  # a cycle or an outer-scope name: leave the order as it was
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [type(n).FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name, so nodes can be excluded by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


def lift_constants(model: onnx.ModelProto) -> int:
    """Turn the main graph's float `Constant` nodes into initializers of the same name, as
    exporters such as paddle2onnx write layer weights (every weight an initializer is what the
    quantizers, weight sharing and pruning look for). The outputs are unchanged: a Constant's
    output and an initializer are read the same way. Returns how many were lifted."""
    from onnx import TensorProto, numpy_helper

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    graph = model.graph
    kept, lifted = [], []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        is_constant = node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        if is_constant and value is not None and value.data_type in floats:
            lifted.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        else:
            kept.append(node)
    if lifted:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(lifted)
    return len(lifted)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads (after a rewrite replaced them)."""
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def save_clean(model: onnx.ModelProto, path: Path) -> None:
    """Save with the nodes in topological order and without debug metadata."""
    import onnx

    onnx.save(sort_nodes(strip_debug_metadata(model)), str(path))


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightLayer:
    """A Conv/Gemm/MatMul node whose weight (input 1) is an initializer.

    `out_axis` is the weight's axis of output channels (Conv 0, Gemm 0 with transB else 1,
    MatMul the last); `in_axis` the axis a layer reduces over (Conv 1: groups run over
    in·kh·kw of each output; Gemm the other one; MatMul K, the second last).
    """

    index: int  # the node's position in graph.node
    node: onnx.NodeProto
    weight: str
    out_axis: int
    in_axis: int

    @property
    def name(self) -> str:
        return str(self.node.name)


def weight_axes(node: onnx.NodeProto, ndim: int) -> tuple[int, int]:
    """(output-channel axis, reduction axis) of a Conv/Gemm/MatMul weight of `ndim` dims."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)
    return ndim - 1, ndim - 2


def weight_layers(model: onnx.ModelProto, min_ndim: int = 2) -> list[WeightLayer]:
    """Conv/Gemm/MatMul nodes with a constant weight of at least `min_ndim` dims, in graph order
    (a weight shared by several nodes is listed once per node)."""
    dims = {t.name: len(t.dims) for t in model.graph.initializer}
    found = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS or len(node.input) <= WEIGHT_INPUT:
            continue
        weight = node.input[WEIGHT_INPUT]
        if weight not in dims or dims[weight] < min_ndim:
            continue
        out_axis, in_axis = weight_axes(node, dims[weight])
        found.append(WeightLayer(index, node, weight, out_axis, in_axis))
    return found


def bias_of(node: onnx.NodeProto) -> str | None:
    """The bias input of a Conv/Gemm node, if it has one."""
    slot = BIAS_INPUT.get(node.op_type)
    if slot is None or len(node.input) <= slot or not node.input[slot]:
        return None
    return str(node.input[slot])


# ----------------------------------------------------------------------------- exclude


def matches(names: Iterable[str], patterns: Iterable[str]) -> bool:
    """Whether any of the names (a node's, its weight's) matches a shell-style pattern
    (`exclude` / `ignore` in the op configs; case-sensitive)."""
    patterns = list(patterns)
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)
