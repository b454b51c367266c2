"""Attention and feed-forward blocks of a lifted transformer graph, and removing whole units.

A block is a set of nn.Linear modules whose features are coupled in units and to nothing else:
- attention: the query/key/value projections (output features grouped by head: head h owns
  features h·d .. (h+1)·d−1), the view/permute/matmul/softmax or scaled_dot_product_attention
  between them, and the output projection (input features grouped the same way);
- ffn: one or more Linears (up, and a gate) → elementwise ops (GELU, ReLU, SiLU, the gate's
  product) → one Linear (down); a unit is one intermediate channel.

find_blocks follows each Linear's output features (the "unit axis") forward through the ops
that keep them intact: a view that splits them into [heads, head_dim] or merges them back,
permute/transpose, matmul over the other axes, softmax over another axis, elementwise ops with
tensors broadcast along it. Where the axis meets anything else (a LayerNorm, a residual add, a
model output) the candidate is dropped, so the residual width, embeddings and norms are never
touched. torch.export bakes the head count into the int arguments of view/reshape nodes;
remove_units slices the Linears and rewrites those constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import fx

Shapes = dict[Any, tuple[Any, ...]]

_IDENTITY = {
    "contiguous",
    "clone",
    "alias",
    "detach",
    "to",
    "_to_copy",
    "dropout",
    "lift_fresh_copy",
}
_UNARY = {
    "gelu",
    "relu",
    "relu6",
    "silu",
    "sigmoid",
    "tanh",
    "erf",
    "exp",
    "neg",
    "sqrt",
    "rsqrt",
    "abs",
    "square",
    "reciprocal",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "leaky_relu",
    "elu",
    "mish",
    "softplus",
    "clamp",
    "clamp_min",
    "clamp_max",
}
_BINARY = {"add", "sub", "mul", "div", "rsub", "pow", "maximum", "minimum", "where", "masked_fill"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}
_VIEW = {"view", "reshape", "_unsafe_view"}
_NO_OUTPUT = {"_assert_tensor_metadata"}


@dataclass
class ShapeArg:
    """An int in a view/reshape's shape that holds the unit count (× per_unit features)."""

    node: Any
    position: int
    per_unit: int


@dataclass
class Block:
    """Linears coupled in `units` units: the sources' output features, the sink's inputs."""

    kind: str  # "attention" (a unit is a head) or "ffn" (a unit is a channel)
    name: str
    sources: list[str]
    sink: str
    units: int
    unit_sizes: dict[str, int]  # features per unit of each source and of the sink
    shape_args: list[ShapeArg] = field(default_factory=list)

    @property
    def linears(self) -> list[str]:
        return [*self.sources, self.sink]


@dataclass(frozen=True)
class _Tag:
    """Where a value carries a source Linear's features: `axis` counted from the end."""

    root: Any
    axis: int
    heads: int | None  # None before a split: every feature is its own unit
    size: int | None  # features per head after a split (None for attention scores)
    merged: bool  # the axis holds heads·size features (True) or the heads (False)


class _Stop(Exception):
    """The unit axis meets an op that couples it to something else; `passes` when the output
    still has the units in place (so the rest of the block is still found and reported once)."""

    def __init__(self, reason: str, passes: bool = False) -> None:
        super().__init__(reason)
        self.passes = passes


@dataclass
class _Group:
    sources: list[Any] = field(default_factory=list)
    sinks: list[tuple[Any, _Tag]] = field(default_factory=list)
    splits: dict[Any, tuple[int, int]] = field(default_factory=dict)
    shape_args: list[ShapeArg] = field(default_factory=list)
    core: bool = False
    reasons: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- shapes


def _hint(d: Any) -> Any:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else str(d)


def meta_shapes(gm: fx.GraphModule) -> Shapes:
    """Every tensor node's shape from its export metadata (symbolic sizes at their hint)."""
    import torch

    shapes: Shapes = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if val is None and node.op == "get_attr":
            val = _get_attr(gm, node)
        if isinstance(val, torch.Tensor):
            shapes[node] = tuple(_hint(d) for d in val.shape)
    return shapes


def traced_shapes(gm: fx.GraphModule, example: Sequence[Any]) -> Shapes:
    """Every tensor node's shape in one run on `example` (current after a rewrite)."""
    import torch

    shapes: Shapes = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        Recorder(gm).run(*example)
    return shapes


def _get_attr(gm: fx.GraphModule, node: Any) -> Any:
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


# ----------------------------------------------------------------------------- propagation


def _opname(node: Any) -> str | None:
    import torch

    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return str(target._opname)
    return None


def _norm(dim: int, ndim: int) -> int:
    """A dim counted from the end (negative)."""
    return dim - ndim if dim >= 0 else dim


def _linear_of(gm: fx.GraphModule, node: Any) -> Any:
    from torch import nn

    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if isinstance(mod, nn.Linear) else None


def _broadcasts(shape: tuple[Any, ...] | None, axis: int) -> bool:
    """Whether a tensor of `shape` is broadcast along `axis` (counted from the end)."""
    if shape is None:
        return False
    return len(shape) < -axis or shape[axis] == 1


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b, strict=True))


def _shape_arg(node: Any, position: int, per_unit: int) -> list[ShapeArg]:
    value = list(node.args[1])[position]
    if isinstance(value, int):
        return [] if value == -1 else [ShapeArg(node, position, per_unit)]
    raise _Stop(f"{node.name} computes the head count at run time")


def _view(node: Any, tag: _Tag, shapes: Shapes) -> tuple[_Tag, list[ShapeArg], Any]:
    """A view/reshape: split features into [heads, size], merge them back, or leave them."""
    src, out = shapes.get(node.args[0]), shapes.get(node)
    if src is None or out is None:
        raise _Stop(f"{node.name} has no known shape")
    a = len(src) + tag.axis
    if _same(src, out):
        per_unit = tag.size if tag.merged and tag.heads and tag.size else 1
        return tag, _shape_arg(node, a, per_unit), None
    if tag.merged and len(out) == len(src) + 1:
        heads, size = out[a], out[a + 1]
        fits = isinstance(heads, int) and isinstance(size, int) and heads * size == src[a]
        if (
            fits
            and _same(out[:a], src[:a])
            and _same(out[a + 2 :], src[a + 1 :])
            and (tag.heads is None or (tag.heads, tag.size) == (heads, size))
        ):
            new = _Tag(tag.root, a - len(out), heads, size, merged=False)
            return new, _shape_arg(node, a, 1), (heads, size)
    merges = not tag.merged and tag.size and len(out) == len(src) - 1 and a + 1 < len(src)
    if (
        merges
        and src[a + 1] == tag.size
        and out[a] == src[a] * src[a + 1]
        and _same(out[:a], src[:a])
        and _same(out[a + 1 :], src[a + 2 :])
    ):
        new = _Tag(tag.root, a - len(out), tag.heads, tag.size, merged=True)
        return new, _shape_arg(node, a, tag.size or 1), None
    raise _Stop(f"{node.name} reshapes {list(src)} to {list(out)} across the head axis")


def _step(
    gm: fx.GraphModule, node: Any, tags: dict[Any, _Tag], shapes: Shapes
) -> tuple[_Tag | None, list[ShapeArg], Any, bool]:
    """The output's tag, shape constants to rewrite, a split (heads, size), and core-op flag."""
    op = _opname(node)
    tagged = [a for a in node.all_input_nodes if a in tags]
    tag = tags[tagged[0]]
    if op in _NO_OUTPUT:
        return None, [], None, False
    if op in ("sym_size",):
        if _norm(int(node.args[1]), len(shapes.get(node.args[0], ()))) == tag.axis:
            raise _Stop(f"{node.name} reads the head count at run time")
        return None, [], None, False
    if op in _IDENTITY or op in _UNARY:
        if node.args[0] is not tagged[0] or len(tagged) > 1:
            raise _Stop(f"{node.name} ({op}) mixes the units with another tensor")
        return tag, [], None, False
    if op in _SOFTMAX:
        if _norm(int(node.args[1]), len(shapes.get(node, ()))) == tag.axis:
            raise _Stop(f"{node.name} ({op}) normalises across the units")
        return tag, [], None, False
    if op in _BINARY:
        for other in node.all_input_nodes:
            if other in tags:
                t = tags[other]
                if (t.axis, t.merged) != (tag.axis, tag.merged) or (
                    t.heads and tag.heads and t.heads != tag.heads
                ):
                    raise _Stop(f"{node.name} ({op}) combines differently laid out units")
            elif not _broadcasts(shapes.get(other), tag.axis):
                raise _Stop(f"{node.name} ({op}) mixes the units with {other.name}", passes=True)
        return tag, [], None, False
    if op in _VIEW:
        if node.args[0] is not tagged[0]:
            raise _Stop(f"{node.name} uses the units as a shape")
        out, args, split = _view(node, tag, shapes)
        return out, args, split, False
    if op == "permute":
        ndim = len(shapes.get(node.args[0], ()))
        dims = [d % ndim for d in node.args[1]]
        return _moved(tag, dims.index(ndim + tag.axis) - ndim), [], None, False
    if op == "transpose":
        ndim = len(shapes.get(node.args[0], ()))
        d0, d1 = (_norm(int(d), ndim) for d in node.args[1:3])
        axis = d1 if tag.axis == d0 else d0 if tag.axis == d1 else tag.axis
        return _moved(tag, axis), [], None, False
    if op in ("matmul", "bmm"):
        a, b = node.args[0], node.args[1]
        ta, tb = tags.get(a), tags.get(b)
        if ta is None or tb is None or ta.merged or tb.merged:
            raise _Stop(f"{node.name} ({op}) multiplies the heads with an unsplit tensor")
        if ta.axis != tb.axis or ta.axis > -3 or ta.heads != tb.heads:
            raise _Stop(f"{node.name} ({op}) multiplies along the head axis")
        size = tb.size if ta.size is None else None
        return _Tag(tag.root, ta.axis, ta.heads, size, merged=False), [], None, True
    if op == "scaled_dot_product_attention":
        qkv = [tags.get(x) for x in node.args[:3]]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if any(t is None or t.merged or t.axis != -3 for t in qkv):
            raise _Stop(f"{node.name} (scaled_dot_product_attention) gets unsplit inputs")
        if len({t.heads for t in qkv if t is not None}) != 1 or node.kwargs.get("enable_gqa"):
            raise _Stop(f"{node.name} (scaled_dot_product_attention) groups query heads")
        if mask is not None and (mask in tags or not _broadcasts(shapes.get(mask), -3)):
            raise _Stop(f"{node.name}'s attention mask differs per head", passes=True)
        v = qkv[2]
        assert v is not None
        return _Tag(tag.root, -3, v.heads, v.size, merged=False), [], None, True
    what = op or (f"module {node.target}" if node.op == "call_module" else str(node.target))
    raise _Stop(f"{node.name} ({what}) couples the units to other features")


def _moved(tag: _Tag, axis: int) -> _Tag:
    return _Tag(tag.root, axis, tag.heads, tag.size, tag.merged)


def find_blocks(gm: fx.GraphModule, shapes: Shapes) -> tuple[list[Block], list[str]]:
    """The attention and ffn blocks of a lifted graph, and why attention-like candidates were
    not taken (one line each)."""
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        while parent[x] is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    groups: dict[Any, _Group] = {}
    tags: dict[Any, _Tag] = {}
    for node in gm.graph.nodes:
        tagged = [a for a in node.all_input_nodes if a in tags]
        roots = list(dict.fromkeys(find(tags[a].root) for a in tagged))
        root = roots[0] if roots else None
        for other in roots:  # everything one op combines belongs to one block
            if other is not root:
                parent[other] = root
                g, into = groups.pop(other), groups[root]
                into.sources += g.sources
                into.sinks += g.sinks
                into.splits.update(g.splits)
                into.shape_args += g.shape_args
                into.core |= g.core
                into.reasons += g.reasons
        group = groups[root] if root is not None else None
        linear = _linear_of(gm, node)
        if linear is not None:
            if group is not None:
                tag = tags[tagged[0]]
                if tag.merged and tag.axis == -1:
                    group.sinks.append((node, tag))
                else:
                    group.reasons.append(f"{node.name} reads the heads along another axis")
            parent[node] = node
            groups[node] = _Group(sources=[node])
            tags[node] = _Tag(node, -1, None, None, merged=True)
            continue
        if group is None:
            continue
        if node.op == "output":
            group.reasons.append("the units reach a model output")
            continue
        try:
            out, args, split, core = _step(gm, node, tags, shapes)
        except _Stop as stop:
            group.reasons.append(str(stop))
            if stop.passes:
                tags[node] = tags[tagged[0]]
            continue
        if split is not None:
            group.splits[tags[tagged[0]].root] = split
        group.shape_args += args
        group.core |= core
        if out is not None:
            tags[node] = out
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks, skipped = [], []
    for group in groups.values():
        group.sources.sort(key=index.__getitem__)
        block, why = _block(gm, group)
        if block is not None:
            blocks.append(block)
        elif why:
            skipped.append(why)
    order = {str(n.target): i for n, i in index.items() if n.op == "call_module"}
    blocks.sort(key=lambda b: order[b.sink])
    return blocks, skipped


def attention_blocks(gm: fx.GraphModule) -> list[Block] | None:
    """find_blocks on the export's shapes (meta_shapes) when it sees attention, else None (no
    attention, or a graph it cannot follow: the op that prunes says why)."""
    try:
        found, skipped = find_blocks(gm, meta_shapes(gm))
    except Exception:
        return None
    return found if has_attention(found, skipped) else None


def has_attention(blocks: list[Block], skipped: list[str]) -> bool:
    """Whether find_blocks saw attention (taken or not): then channel removal prunes heads and
    FFN channels only, never the residual width."""
    return bool(skipped) or any(b.kind == "attention" for b in blocks)


def _block(gm: fx.GraphModule, group: _Group) -> tuple[Block | None, str | None]:
    """A valid block from a group, or (None, why) for an attention-like one that is not."""
    names = [str(n.target) for n in group.sources]
    attention = group.core  # attention-like: heads meet in a matmul or SDPA
    label = _prefix(names) or names[0]

    def refuse(why: str) -> tuple[None, str | None]:
        return None, (f"{label}: {why}" if attention else None)

    if group.reasons:
        return refuse(group.reasons[0])
    if len(group.sinks) != 1:
        return refuse(f"the units reach {len(group.sinks)} output projections")
    sink, tag = group.sinks[0]
    if sink in group.sources:
        return refuse("the output projection feeds back into the block")
    linears = {str(n.target): _linear_of(gm, n) for n in [*group.sources, sink]}
    sink_name = str(sink.target)
    if attention:
        splits = [group.splits.get(s) for s in group.sources]
        if not group.core or any(s is None for s in splits) or tag.heads is None:
            return refuse("not every projection is split into heads")
        heads = tag.heads
        if any(s is not None and s[0] != heads for s in splits):
            return refuse("the projections have different head counts")
        sizes = {str(n.target): s[1] for n, s in zip(group.sources, splits, strict=True) if s}
        sizes[sink_name] = linears[sink_name].in_features // heads
        if linears[sink_name].in_features != heads * sizes[sink_name]:
            return refuse("the output projection's inputs are not whole heads")
        kind = "attention"
    elif group.splits:
        return None, None  # split into groups but never attended over: not a block
    else:
        heads = linears[sink_name].in_features
        sizes = {name: 1 for name in linears}
        kind = "ffn"
    for name in names:
        if linears[name].out_features != heads * sizes[name]:
            return refuse(f"{name}'s outputs are not whole units")
    block = Block(
        kind=kind,
        name=_prefix([*names, sink_name]) or sink_name,
        sources=names,
        sink=sink_name,
        units=heads,
        unit_sizes=sizes,
        shape_args=group.shape_args,
    )
    return block, None


def _prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


# ----------------------------------------------------------------------------- rewrite


def unit_index(keep: Sequence[int], size: int) -> torch.Tensor:
    """The feature indices of the kept units, `size` features each."""
    import torch

    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in keep])


def remove_units(gm: fx.GraphModule, block: Block, keep: Sequence[int]) -> None:
    """Keep only the units `keep` (sorted) of the block: slice its Linears, rewrite its views."""
    import torch
    from torch import nn

    keep = sorted(keep)
    for name in block.linears:
        mod = gm.get_submodule(name)
        assert isinstance(mod, nn.Linear)
        dim = 1 if name == block.sink else 0
        idx = unit_index(keep, block.unit_sizes[name])
        with torch.no_grad():
            mod.weight = nn.Parameter(mod.weight.index_select(dim, idx).clone())
            if dim == 0 and mod.bias is not None:
                mod.bias = nn.Parameter(mod.bias.index_select(0, idx).clone())
        if dim == 0:
            mod.out_features = len(idx)
        else:
            mod.in_features = len(idx)
    for arg in block.shape_args:
        shape = list(arg.node.args[1])
        shape[arg.position] = len(keep) * arg.per_unit
        arg.node.update_arg(1, shape)
    block.units = len(keep)
    gm.recompile()
