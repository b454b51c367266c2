"""A torch.export .pt2 lifted to a model torch ops can train and reshape (real layers).

The exported graph calls functional aten ops (aten.conv2d, aten.linear, aten.batch_norm) on
get_attr weights, which Torch-Pruning's dependency graph and optimisers cannot see as layers;
lift_modules turns them back into nn.Conv2d / nn.Linear / nn.BatchNorm2d modules on an fx
GraphModule (at their original names); engine.torchgraph.program saves the result as a .pt2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError
from engine.io.formats import load_exported_program

if TYPE_CHECKING:
    import torch
    from torch import nn


def _attr(gm: torch.fx.GraphModule, node: Any) -> Any:
    """The tensor a get_attr node names (None for a missing optional argument)."""
    if node is None:
        return None
    if getattr(node, "op", None) != "get_attr":
        raise ValueError("not a get_attr")
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    import torch

    return torch.nn.Parameter(t.detach().clone())


def _conv(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    from torch import nn

    args = list(node.args) + [None] * 7
    x, w, b, stride, padding, dilation, groups = args[:7]
    del x
    if w is None or w.op != "get_attr" or (b is not None and b.op != "get_attr"):
        return None
    weight = _attr(gm, w)
    if weight.dim() != 4:
        return None
    groups = int(groups or 1)
    if isinstance(padding, str):
        return None
    conv = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(stride or (1, 1)),
        padding=tuple(padding or (0, 0)),
        dilation=tuple(dilation or (1, 1)),
        groups=groups,
        bias=b is not None,
    )
    conv.weight = _param(weight)
    if b is not None:
        conv.bias = _param(_attr(gm, b))
    return conv


def _linear(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    from torch import nn

    args = list(node.args) + [None] * 3
    w, b = args[1], args[2]
    if w is None or w.op != "get_attr" or (b is not None and b.op != "get_attr"):
        return None
    weight = _attr(gm, w)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
    linear.weight = _param(weight)
    if b is not None:
        linear.bias = _param(_attr(gm, b))
    return linear


def _batch_norm(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    """aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn) in eval mode, 4-D."""
    from torch import nn

    args = list(node.args)
    if len(args) < 8:
        return None
    _, w, b, mean, var, training, momentum, eps = args[:8]
    if training or any(a is None or a.op != "get_attr" for a in (w, b, mean, var)):
        return None
    val = node.meta.get("val")
    if val is None or val.dim() != 4:
        return None
    weight = _attr(gm, w)
    bn = nn.BatchNorm2d(weight.shape[0], eps=float(eps), momentum=float(momentum or 0.1))
    bn.weight = _param(weight)
    bn.bias = _param(_attr(gm, b))
    assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats
    bn.running_mean.copy_(_attr(gm, mean).detach())
    bn.running_var.copy_(_attr(gm, var).detach())
    return bn.eval()


def _layer_norm(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    """aten.layer_norm(x, normalized_shape, weight, bias, eps, cudnn)."""
    from torch import nn

    args = list(node.args) + [None] * 5
    _, shape, w, b, eps = args[:5]
    if w is None or w.op != "get_attr" or (b is not None and b.op != "get_attr"):
        return None
    norm = nn.LayerNorm(list(shape), eps=float(eps or 1e-5), bias=b is not None)
    norm.weight = _param(_attr(gm, w))
    if b is not None:
        norm.bias = _param(_attr(gm, b))
    return norm


def _embedding(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    """aten.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)."""
    from torch import nn

    args = list(node.args) + [-1, False, False]
    w, _, padding_idx, scale, sparse = args[:5]
    if getattr(w, "op", None) != "get_attr" or scale or sparse:
        return None
    weight = _attr(gm, w)
    pad = int(padding_idx) if padding_idx is not None and int(padding_idx) >= 0 else None
    emb = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=pad)
    emb.weight = _param(weight)
    return emb


# aten op → (builder, index of its weight argument, index of its data input)
def _lifters() -> dict[Any, tuple[Any, int, int]]:
    import torch

    aten = torch.ops.aten
    return {
        aten.conv2d.default: (_conv, 1, 0),
        aten.linear.default: (_linear, 1, 0),
        aten.batch_norm.default: (_batch_norm, 1, 0),
        aten.layer_norm.default: (_layer_norm, 2, 0),
        aten.embedding.default: (_embedding, 0, 1),
    }


def _module_path(weight_node: Any) -> str:
    """Where the lifted module lives: the owner of its weight ("features.0.weight" → "features.0").

    Re-exporting the lifted model names the weight "<path>.weight" again, so a model that goes
    through several torch steps keeps the user's layer names (what `ignore` patterns match).
    """
    owner, _, _ = str(weight_node.target).rpartition(".")
    return owner


def lift_modules(ep: torch.export.ExportedProgram) -> tuple[torch.fx.GraphModule, list[str]]:
    """A trainable GraphModule whose conv2d/linear/batch_norm calls are real modules.

    Each lifted module sits at its weight's original path (e.g. "features.0"), so layer names
    survive re-export. Returns the module and the names of the Conv/Linear modules that produce
    a graph output (the classifier: its outputs are the model's outputs, never pruned).
    """
    import torch
    from torch import nn

    lifters = _lifters()
    source = ep.module()
    # Decide what is lifted first, so the lifted weights are not copied as loose tensors.
    plan: list[tuple[Any, nn.Module, str]] = []
    inputs: dict[Any, int] = {}
    taken: set[str] = set()
    for node in source.graph.nodes:
        lifter = lifters.get(node.target) if node.op == "call_function" else None
        module = lifter[0](source, node) if lifter else None
        if module is None or lifter is None:
            continue
        inputs[node] = lifter[2]
        path = _module_path(node.args[lifter[1]])
        if not path or path in taken:
            path = f"lifted_{node.name}"
        taken.add(path)
        plan.append((node, module, path))
    lifted_inputs = {
        str(a.target)
        for node, _, _ in plan
        for i, a in enumerate(node.args)
        if i != inputs[node] and getattr(a, "op", None) == "get_attr"
    }
    root = nn.Module()

    def owner_of(path: str) -> tuple[nn.Module, str]:
        owner = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        return owner, leaf

    for node, module, path in plan:
        owner, leaf = owner_of(path)
        if hasattr(owner, leaf):  # a container already there (a path prefix of another)
            path = f"lifted_{node.name}"
            owner, leaf = owner_of(path)
        owner.add_module(leaf, module)
    for i, (node, module, path) in enumerate(plan):
        if root.get_submodule(path) is not module:
            plan[i] = (node, module, f"lifted_{node.name}")
    # Everything else the graph reads by get_attr stays reachable on the new root.
    for node in source.graph.nodes:
        if node.op != "get_attr" or str(node.target) in lifted_inputs:
            continue
        value = _attr(source, node)
        owner, leaf = owner_of(str(node.target))
        if hasattr(owner, leaf):
            continue
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value.detach().clone())
        else:
            setattr(owner, leaf, value)
    # A plain copy of the graph: positional inputs, no pytree in/out wrapping of ep.module().
    graph = torch.fx.Graph()
    env: dict[Any, Any] = {}
    graph.output(graph.graph_copy(source.graph, env))
    gm = torch.fx.GraphModule(root, graph)
    lifted: dict[str, nn.Module] = {}
    for old_node, module, path in plan:
        node = env[old_node]
        gm.add_submodule(path, module)  # GraphModule() copied only what the graph referenced
        lifted[path] = module
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[inputs[old_node]],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, _output_layers(gm, lifted)


def weight_layers(gm: nn.Module) -> dict[str, Any]:
    """The model's nn.Conv2d and nn.Linear modules by name: what pruning, factorization and
    quantization-aware training act on."""
    from torch import nn

    return {name: m for name, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _output_layers(gm: torch.fx.GraphModule, lifted: dict[str, nn.Module]) -> list[str]:
    """Lifted Conv/Linear modules that feed a graph output through no other Conv/Linear."""
    from torch import nn

    found: list[str] = []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stack = list(output.all_input_nodes)
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = lifted.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            found.append(str(node.target))
            continue
        stack.extend(node.all_input_nodes)
    return found


def _layer_of(node: Any) -> str:
    """The user's module path a graph node came from (nn_module_stack), or the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path) or node.name
    return str(node.name)


def preflight(model_path: Path, reshapes_channels: bool) -> None:
    """Before any compute: refuse a .pt2 the torch steps cannot handle, naming op and layer.

    Every graph must be straight-line (no torch.cond / while_loop / map). Steps that remove
    channels (prune granularity channels, distill with a width student) on a model without
    attention blocks also need every float weight to be read by a layer Torch-Pruning can see
    (conv2d, linear, batch_norm, layer_norm, embedding with constant weights); any other op
    reading one would be left with the old channel count. Integer and bool tensors (index
    tables such as `position_ids`, masks) carry no channels and pass. A model with attention
    blocks (engine.torchgraph.blocks) is pruned by heads and FFN channels only, which changes
    nothing but the blocks' own Linears, so other ops may read any weight.
    """
    import torch

    from engine.torchgraph.blocks import find_blocks, has_attention, meta_shapes

    ep = load_exported_program(model_path)
    gm = ep.module()
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and (
            isinstance(node.target, torch._ops.HigherOrderOperator) or "higher_order" in name
        ):
            raise EngineError(
                "unsupported_op",
                f"Layer {_layer_of(node)!r} uses {name} (data-dependent control flow), which the "
                "torch steps (pruning with training or channels, distill, fine_tune, low_rank, "
                "qat) cannot rewrite. Export a straight-line graph, or use ONNX-side ops "
                "(quantize; prune unstructured/n:m with magnitude, one-shot).",
                field="model_id",
            )
    if not reshapes_channels:
        return
    lifted, _ = lift_modules(ep)
    if has_attention(*find_blocks(lifted, meta_shapes(lifted))):
        return
    lifters = _lifters()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        lifter = lifters.get(node.target)
        if lifter is not None and lifter[0](gm, node) is not None:
            continue
        weights = [str(a.target) for a in node.args if _is_weight(gm, a)]
        if weights:
            raise EngineError(
                "unsupported_op",
                f"Layer {_layer_of(node)!r} applies {node.target} to the weight {weights[0]!r}; "
                "channel removal (prune granularity 'channels', distill student 'width') only "
                "sees conv2d, linear, batch_norm, layer_norm and embedding layers, so this "
                "weight would keep stale channels. Use granularity 'unstructured' or 'n:m', or "
                "list the layer's neighbours in 'ignore' if they are not coupled to it.",
                field="pipeline",
            )


def _is_weight(gm: torch.fx.GraphModule, arg: Any) -> bool:
    """A float constant of 2+ dims: what channel removal would have to reshape."""
    if getattr(arg, "op", None) != "get_attr":
        return False
    value = _attr(gm, arg)
    return bool(getattr(value, "dim", lambda: 0)() >= 2 and value.is_floating_point())
