"""The operator allow-list a .pt2 graph must pass before torch ever loads it.

The serialized program is JSON: every node names its target as a string. We walk all nodes,
including the subgraphs of higher-order ops (cond, while_loop, map, scan), and refuse anything
that is not a compute op: file and storage ops, printing and effect tokens, torchbind calls,
and every operator outside the standard namespaces (a custom op would run the uploader's code).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from worker.engine.errors import EXPORT_HOWTO, EngineError

# Namespaces whose operators are tensor compute (minus REFUSED_OPS below).
COMPUTE_NAMESPACES = frozenset({"aten", "prims", "quantized", "quantized_decomposed"})

# aten/prims operators that reach files, raw storages, stdout or the effect system.
REFUSED_OPS = frozenset(
    {
        "aten.from_file",
        "aten.set_",
        "aten._print",
        "aten._make_dep_token",
        "aten.save",
        "aten.load",
    }
)

# Higher-order ops whose bodies are subgraphs we also check; nothing else from that namespace.
HIGHER_ORDER_OPS = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "invoke_subgraph",
        "out_dtype",
    }
)

# Python-level helpers torch.export writes for tuple access and symbolic shape arithmetic.
PYTHON_HELPERS = frozenset(
    {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv")}
    | {f"_operator.{name}" for name in ("mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt")}
    | {f"_operator.{name}" for name in ("le", "gt", "ge", "and_", "or_", "not_", "xor")}
    | {f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt")}
    | {f"torch.{name}" for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not")}
    | {f"torch.{name}" for name in ("sym_ite", "sym_sum", "sym_sqrt", "_sym_sqrt")}
    | {"torch._C._set_grad_enabled"}
)

MAX_DEPTH = 32


def _refused(node: str, target: str, why: str) -> EngineError:
    return EngineError(
        "unsupported_op",
        f"The .pt2 graph calls {target!r} in node {node!r}: {why}. Only tensor compute "
        "operators (aten, prims, quantized) and torch.export's own control flow are loaded. "
        "Remove the call from forward() and export again. " + EXPORT_HOWTO,
        field="file",
    )


def check_target(node: str, target: str) -> None:
    """Raise unsupported_op unless `target` (as serialized) is on the allow-list."""
    if target in PYTHON_HELPERS:
        return
    parts = target.split(".")
    if len(parts) < 4 or parts[:2] != ["torch", "ops"]:
        raise _refused(node, target, "this is not a torch operator")
    namespace, op = parts[2], parts[3]
    if namespace == "higher_order":
        if op not in HIGHER_ORDER_OPS:
            raise _refused(node, target, "this higher-order op runs code outside the graph")
        return
    if namespace not in COMPUTE_NAMESPACES:
        raise _refused(node, target, f"operators of the {namespace!r} namespace are not loaded")
    if f"{namespace}.{op}" in REFUSED_OPS or "storage" in parts[-1].lower():
        raise _refused(node, target, "this operator reads or writes files or raw storage")


def _subgraphs(value: Any) -> Iterator[dict[str, Any]]:
    """Graphs nested in a node argument (higher-order op bodies), at any depth of lists."""
    if isinstance(value, dict):
        graph = value.get("as_graph")
        if isinstance(graph, dict) and isinstance(graph.get("graph"), dict):
            yield graph["graph"]
        for key, item in value.items():
            if key != "as_graph":
                yield from _subgraphs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _subgraphs(item)


def _operators(value: Any) -> Iterator[str]:
    """Operators passed as arguments (auto_functionalized and friends carry their target)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "as_operator" and isinstance(item, str):
                yield item
            elif key != "as_graph":
                yield from _operators(item)
    elif isinstance(value, list):
        for item in value:
            yield from _operators(item)


def check_graph(graph: dict[str, Any], depth: int = 0) -> int:
    """Check every node of a serialized graph and its subgraphs; returns the nodes checked."""
    if depth > MAX_DEPTH:
        raise EngineError(
            "invalid_model",
            f"The .pt2 graph nests subgraphs more than {MAX_DEPTH} levels deep.",
            field="file",
        )
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise EngineError("invalid_model", "The .pt2 graph has no node list.", field="file")
    count = 0
    for index, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("target"), str):
            raise EngineError(
                "invalid_model", f"Node {index} of the .pt2 graph has no target.", field="file"
            )
        name = str(node.get("name") or f"#{index}")
        check_target(name, node["target"])
        for op in _operators(node.get("inputs")):
            check_target(name, op)
        for sub in _subgraphs(node.get("inputs")):
            count += check_graph(sub, depth + 1)
        count += 1
    return count


def check_program(program: Any) -> int:
    """Check a serialized ExportedProgram (the parsed JSON); returns the nodes checked."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise EngineError("invalid_model", "The .pt2 program has no graph_module.", field="file")
    module = program["graph_module"]
    if not isinstance(module.get("graph"), dict):
        raise EngineError("invalid_model", "The .pt2 program has no graph.", field="file")
    if module["graph"].get("custom_obj_values"):
        raise _refused("graph", "custom objects", "torchbind objects run native code on load")
    return check_graph(module["graph"])
