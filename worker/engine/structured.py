"""Channel pruning of a torch.export .pt2: remove whole output channels/neurons with Torch-Pruning.

The exported graph calls functional aten ops (aten.conv2d, aten.linear, aten.batch_norm) on
get_attr weights, which Torch-Pruning's dependency graph cannot see; they are lifted back into
nn.Conv2d / nn.Linear / nn.BatchNorm2d modules first. Torch-Pruning then removes channels
consistently across coupled layers (BatchNorm, residual adds, concatenations, depthwise convs),
the result is optionally fine-tuned on the job's labelled data, re-exported with torch.export and
converted to ONNX with the engine's exporter, so later steps and the metrics see a normal ONNX.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine.config import PruneConfig
from worker.engine.errors import EngineError
from worker.engine.export import quiet
from worker.engine.formats import load_exported_program
from worker.engine.registry import StepContext, register

if TYPE_CHECKING:
    import torch
    from torch import nn

FINE_TUNE_BATCH = 64
EXAMPLE_BATCH = 4
# Kept channel counts are multiples of 8: onnxruntime's blocked (NCHWc) CPU conv kernels run
# odd counts slower than the unpruned layer (measured: 22 of 32 channels 1.6x slower, 24 faster).
ROUND_TO = 8


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


def lift_modules(ep: torch.export.ExportedProgram) -> tuple[torch.fx.GraphModule, list[str]]:
    """A trainable GraphModule whose conv2d/linear/batch_norm calls are real modules.

    Returns the module and the names of the Conv/Linear modules that produce a graph output
    (the classifier: its outputs are the model's outputs, so they are never pruned).
    """
    import torch
    from torch import nn

    aten = torch.ops.aten
    builders = {
        aten.conv2d.default: _conv,
        aten.linear.default: _linear,
        aten.batch_norm.default: _batch_norm,
    }
    source = ep.module()
    root = nn.Module()
    # Everything the graph reads by get_attr stays reachable on the new root.
    for node in source.graph.nodes:
        if node.op == "get_attr":
            value = _attr(source, node)
            owner = root
            *path, leaf = str(node.target).split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
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
    for node in list(gm.graph.nodes):
        build = builders.get(node.target) if node.op == "call_function" else None
        module = build(gm, node) if build else None
        if module is None:
            continue
        name = f"lifted_{node.name}"
        gm.add_module(name, module)
        lifted[name] = module
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    # Drop the now unused original weights so they are neither trained nor counted.
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if not name.startswith("lifted_") and name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, leaf)
    gm.recompile()
    return gm, _output_layers(gm, lifted)


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


def _example_args(ctx: StepContext) -> tuple[torch.Tensor, ...]:
    import torch

    size = ctx.batch or EXAMPLE_BATCH
    arrays = []
    for spec in ctx.inputs:
        data = ctx.samples.inputs[spec.name]
        if len(data) < size:
            data = np.concatenate([data] * (size // len(data) + 1))
        arrays.append(torch.from_numpy(np.ascontiguousarray(data[:size])))
    return tuple(arrays)


def _fine_tune(model: nn.Module, config: PruneConfig, ctx: StepContext) -> None:
    import torch

    labels = ctx.samples.labels
    xs = [torch.from_numpy(np.ascontiguousarray(ctx.samples.inputs[s.name])) for s in ctx.inputs]
    yt = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    batch = ctx.batch or FINE_TUNE_BATCH
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(ctx.seed)
    try:
        gen = torch.Generator().manual_seed(ctx.seed)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        model.train()
        n = len(yt)
        for epoch in range(config.fine_tune_epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch):
                idx = order[i : i + batch]
                if ctx.batch and len(idx) != ctx.batch:
                    continue  # a fixed-batch model takes only full batches
                opt.zero_grad()
                logits = model(*(x[idx] for x in xs))
                logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                loss = torch.nn.functional.cross_entropy(logits, yt[idx])
                loss.backward()
                opt.step()
            ctx.report(0.5 + 0.3 * (epoch + 1) / config.fine_tune_epochs, "fine-tuning")
    finally:
        torch.set_num_threads(threads)
        model.eval()


def _can_fine_tune(ctx: StepContext) -> str | None:
    """Why fine-tuning is skipped, or None when the job's data allows it."""
    labels = ctx.samples.labels
    if ctx.samples.source != "dataset" or labels is None:
        return "the job's dataset has no `labels` array"
    if labels.ndim != 1:
        return "the dataset's `labels` are not one integer class per sample"
    return None


@register(PruneConfig, on="torch")
def prune_torch(config: PruneConfig, model_path: Path, ctx: StepContext) -> Path:
    """Prune the pipeline's torch model (.pt2 in, .pt2 out)."""
    if config.granularity == "channels":
        return prune_channels(config, model_path, ctx)
    raise EngineError("unsupported_op", "torch unstructured pruning is not available yet")


def prune_channels(config: PruneConfig, model_path: Path, ctx: StepContext) -> Path:
    """Remove output channels of the torch model and write the result as a .pt2."""
    import torch
    import torch_pruning as tp
    from torch import nn

    ep = load_exported_program(model_path)
    ctx.report(0.05, "lifting conv/linear/batch-norm layers")
    gm, output_layers = lift_modules(ep)
    gm.eval()
    layers = {
        name: mod for name, mod in gm.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))
    }
    if not layers:
        raise EngineError(
            "nothing_to_prune",
            "The model has no conv2d/linear layers with constant weights to prune channels of.",
            field="pipeline",
        )
    ignored = {name for name in output_layers}
    for name in layers:
        if any(fnmatch.fnmatch(name, pat) for pat in config.ignore):
            ignored.add(name)
    if len(ignored) == len(layers):
        raise EngineError(
            "nothing_to_prune",
            "Every conv/linear layer is excluded (the output layer is always kept, plus "
            "'ignore'), so no channel can be removed.",
            field="pipeline",
        )
    example = _example_args(ctx)
    with torch.no_grad():
        before = gm(*example)
    macs0, params0 = tp.utils.count_ops_and_params(gm, example)
    if config.criterion == "random":
        importance: Any = tp.importance.RandomImportance()
    else:
        importance = tp.importance.MagnitudeImportance(p=1 if config.norm == "l1" else 2)
    torch.manual_seed(ctx.seed)
    ctx.report(0.2, "pruning channels")
    try:
        pruner = tp.pruner.MagnitudePruner(
            gm,
            example_inputs=example if len(example) > 1 else example[0],
            importance=importance,
            pruning_ratio=config.sparsity,
            global_pruning=config.scope == "global",
            ignored_layers=[layers[n] for n in ignored],
            round_to=ROUND_TO,
        )
        pruner.step()
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(
            "prune_failed",
            f"Torch-Pruning could not prune this graph ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}). Use granularity 'unstructured' or 'n:m'.",
            field="pipeline",
        ) from exc
    gm.eval()
    macs1, params1 = tp.utils.count_ops_and_params(gm, example)
    with torch.no_grad():
        after = gm(*example)
    shapes = [getattr(t, "shape", None) for t in _flat(before)]
    if shapes != [getattr(t, "shape", None) for t in _flat(after)]:
        raise EngineError("prune_failed", "Channel pruning changed the model's output shapes.")
    if config.fine_tune_epochs > 0:
        reason = _can_fine_tune(ctx)
        if reason is None:
            ctx.report(0.5, "fine-tuning")
            _fine_tune(gm, config, ctx)
            ctx.warnings.append(
                f"Fine-tuned for {config.fine_tune_epochs} epoch(s) on the job's dataset, which "
                "is also the evaluation set: the measured accuracy may be optimistic. Evaluate "
                "on held-out data before deploying."
            )
        else:
            ctx.warnings.append(f"fine_tune_epochs was ignored: {reason}.")
    ctx.report(0.85, "exporting")
    _export(gm, example, ctx)
    ctx.warnings.append(
        f"Removed channels: MACs {macs0:,.0f} → {macs1:,.0f} ({macs1 / macs0:.1%}), parameters "
        f"{params0:,} → {params1:,} ({params1 / params0:.1%}); "
        f"{len(ignored)} output/ignored layer(s) kept whole. Kept channel counts are rounded "
        f"down to multiples of {ROUND_TO} (faster CPU kernels), so more than "
        f"{config.sparsity:.0%} of a layer's channels may be removed."
    )
    return ctx.output


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat(item)]
    return [value]


def _export(gm: torch.fx.GraphModule, example: tuple[Any, ...], ctx: StepContext) -> Path:
    import torch

    dynamic: Any = None
    if ctx.batch is None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic = tuple({0: batch} for _ in example)
    out = ctx.output
    try:
        with quiet():
            program = torch.export.export(gm, example, dynamic_shapes=dynamic)
            torch.export.save(program, str(out))
    except Exception as exc:
        raise EngineError(
            "prune_failed",
            f"The pruned model could not be re-exported with torch.export ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}).",
            field="pipeline",
        ) from exc
    return out
