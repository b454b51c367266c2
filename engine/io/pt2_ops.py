"""The operator and expression allow-lists a .pt2 program must pass before torch loads it.

The serialized program is JSON: every node names its target as a string. We walk all nodes,
including the subgraphs of higher-order ops (cond, while_loop, map, scan), and refuse anything
that is not a compute op: file and storage ops, printing and effect tokens, torchbind calls,
and every operator outside the standard namespaces (a custom op would run the uploader's code).
Symbolic shape expressions, which the loader hands to sympy.sympify (an eval), must be plain
sympy arithmetic.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from typing import Any

from engine.errors import EXPORT_HOWTO, EngineError

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

# Symbolic shapes are stored as sympy expressions in text (`expr_str`), and torch.export.load
# parses them with sympy.sympify, which evaluates Python. Each one must be an expression built
# only from these functions, numbers, symbol names and arithmetic before torch sees it.
SYMPY_FUNCTIONS = frozenset(
    {
        # sympy's core, as torch.export writes it (srepr form)
        *("Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs"),
        *("Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan"),
        *("StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise"),
        *("ExprCondPair", "sqrt", "floor", "ceiling", "BooleanTrue", "BooleanFalse", "true"),
        *("false", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "Half", "One", "Zero"),
        *("NegativeOne", "IntInfinity", "NegativeIntInfinity"),
        # torch.utils._sympy.functions, the names torch's deserializer resolves
        *("FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt"),
        *("FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow"),
        *("FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat"),
        *("TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"),
    }
)
SYMBOL_ASSUMPTIONS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero"}
    | {"even", "odd", "commutative", "evaluate"}
)
SYMBOL_NAME = re.compile(r"^[a-z]{1,8}_?[0-9]{1,9}$")  # s0, u12, zuf3, r0_4 …
MAX_EXPR_CHARS = 10_000
_AST_OPS = (
    ast.Expression, ast.Load, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
    ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or,
)  # fmt: skip


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


def _expression_refused(expr: str, why: str) -> EngineError:
    shown = expr if len(expr) <= 120 else expr[:117] + "..."
    return EngineError(
        "unsupported_op",
        f"The .pt2 program holds a symbolic shape expression {shown!r} that {why}. Symbolic "
        "shapes may only use numbers, shape symbols and sympy arithmetic. " + EXPORT_HOWTO,
        field="file",
    )


def check_expression(expr: str) -> None:
    """Raise unsupported_op unless `expr` is plain sympy arithmetic on numbers and symbols."""
    if len(expr) > MAX_EXPR_CHARS:
        raise _expression_refused(expr, f"is longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise _expression_refused(expr, "does not parse") from exc
    for node in ast.walk(tree):
        if isinstance(node, _AST_OPS):
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or func.id not in SYMPY_FUNCTIONS:
                raise _expression_refused(expr, "calls something other than a sympy function")
            if any(k.arg not in SYMBOL_ASSUMPTIONS for k in node.keywords):
                raise _expression_refused(expr, "passes an unknown keyword")
        elif isinstance(node, ast.keyword):
            continue  # checked with its call
        elif isinstance(node, ast.Name):
            known = node.id in SYMPY_FUNCTIONS or node.id in ("True", "False")
            if not known and not SYMBOL_NAME.match(node.id):
                raise _expression_refused(expr, f"names {node.id!r}")
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and not SYMBOL_NAME.match(value):
                raise _expression_refused(expr, f"holds the string {value!r}")
            if not isinstance(value, bool | int | float | str):
                raise _expression_refused(expr, "holds a constant that is not a number")
        else:
            raise _expression_refused(expr, f"uses Python syntax ({type(node).__name__})")


def _expressions(value: Any) -> Iterator[str]:
    """Every `expr_str` anywhere in the serialized program."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str" and isinstance(item, str):
                yield item
            else:
                yield from _expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item)


def check_program(program: Any) -> int:
    """Check a serialized ExportedProgram (the parsed JSON); returns the nodes checked."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise EngineError("invalid_model", "The .pt2 program has no graph_module.", field="file")
    module = program["graph_module"]
    if not isinstance(module.get("graph"), dict):
        raise EngineError("invalid_model", "The .pt2 program has no graph.", field="file")
    if module["graph"].get("custom_obj_values"):
        raise _refused("graph", "custom objects", "torchbind objects run native code on load")
    for expr in _expressions(program):
        check_expression(expr)
    return check_graph(module["graph"])
