"""Weight-only builders: int8 weights behind a DequantizeLinear, and int4 block-wise weights
in com.microsoft MatMulNBits. Compute stays float; the file shrinks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.onnxgraph.convert import quiet
from engine.onnxgraph.graph import drop_unused_initializers, save_clean, weight_layers

if TYPE_CHECKING:
    import onnx


def _selected(node: onnx.NodeProto, skip: list[str], only: list[str] | None) -> bool:
    return node.name not in skip and (only is None or node.name in only)


def symmetric_int8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, scale): symmetric int8 rounding of a weight per channel along `axis` (None:
    one scale for the tensor); scale = |max| / 127 (1 where the channel is all zero), in the
    weight's dtype; `q * scale` broadcast along `axis` gives the rounded weight back."""
    if axis is None:
        amax = np.abs(w).max(keepdims=False)
        shape = [1] * w.ndim
    else:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(w.dtype)
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def weight_only_int8(
    src: Path, dst: Path, per_channel: bool, skip: list[str], only: list[str] | None
) -> None:
    """Conv/Gemm/MatMul weights stored as symmetric int8 (per output channel) with a
    DequantizeLinear in front: the file shrinks ~4×, compute stays float (opset >= 13)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    done: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for layer in weight_layers(model):
        node, name, axis = layer.node, layer.weight, layer.out_axis
        if not _selected(node, skip, only):
            continue
        if name not in done:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            q, scale = symmetric_int8(w, axis if per_channel else None)
            zp = np.zeros_like(scale, dtype=np.int8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_int8_scale"),
                    numpy_helper.from_array(zp, f"{name}_int8_zp"),
                ]
            )
            dq = helper.make_node(
                "DequantizeLinear",
                [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zp"],
                [f"{name}_dq"],
                name=f"{name}_DequantizeLinear",
            )
            if per_channel:
                dq.attribute.append(helper.make_attribute("axis", axis))
            new_nodes.append(dq)
            done[name] = f"{name}_dq"
        node.input[1] = done[name]
    graph.node.extend(new_nodes)
    drop_unused_initializers(graph)
    save_clean(model, dst)


def _gemm_to_matmul(model: onnx.ModelProto, skip: list[str]) -> None:
    """Gemm(x, W, b) with constant W and default alpha/beta/transA → MatMul + Add, so
    MatMulNBits can take classifier / MLP layers too (names kept on the MatMul)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gemms = {x.index for x in weight_layers(model, min_ndim=0) if x.node.op_type == "Gemm"}
    nodes = []
    for index, node in enumerate(graph.node):
        attrs = {a.name: a for a in node.attribute}
        plain = all(
            (k == "transB") or (k in ("alpha", "beta") and attrs[k].f == 1.0) or attrs[k].i == 0
            for k in attrs
        )
        if index not in gemms or node.name in skip or not plain:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if "transB" in attrs and attrs["transB"].i:
            w = np.ascontiguousarray(w.T)
        wname = f"{node.input[1]}_kn"
        graph.initializer.append(numpy_helper.from_array(w, wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name))
        if has_bias:
            nodes.append(
                helper.make_node(
                    "Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)


def int4_blockwise(
    src: Path,
    dst: Path,
    block: int,
    symmetric: bool | None,
    skip: list[str],
    only: list[str] | None,
) -> None:
    """4-bit block-wise weights in com.microsoft MatMulNBits (onnxruntime's
    MatMulNBitsQuantizer, round-to-nearest, blocks of `block` along K)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    _gemm_to_matmul(model, skip)
    if only is not None:  # nodes_to_include widens op_types_to_quantize; exclude the rest
        skip = skip + [n.name for n in model.graph.node if n.name not in only]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block,
        is_symmetric=bool(symmetric) if symmetric is not None else True,
        nodes_to_exclude=skip,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
    )
    with quiet():
        quantizer.process()
    save_clean(quantizer.model.model, dst)
