"""The layer table of a model, as in the lecture (layer, type, output shape, parameters), plus the
theoretical receptive field of every layer, computed by walking the model's traced graph.

Receptive field arithmetic (per spatial axis), for a layer of kernel k, stride s, padding p,
dilation d applied to an input whose units have receptive field r, jump j and centre c:
``r' = r + (d(k-1)) j``, ``j' = j s``, ``c' = c + (d(k-1)/2 - p) j``. Where branches meet (a residual
sum, an inception concat) the field is the union of the branches'. Layers that mix every
position (linear, global pooling) see the union over all positions of their input. After an operation that
rearranges the axes into another map of 3 or more dimensions (``permute``, ``transpose``, ``view``, ``reshape``
...), the last two axes need no longer be height and width: that node and everything computed from it get no
receptive field (absent, never wrong); a reshape to ``(N, features)`` is a flatten, whose consumers mix everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp


@dataclass(frozen=True)
class Field:
    """Receptive field along one axis: size ``r``, jump (effective stride) ``j``, centre of unit 0 ``c``."""

    r: float
    j: float
    c: float

    def through(self, k: int, s: int, p: int, d: int = 1) -> "Field":
        k_eff = d * (k - 1) + 1
        return Field(self.r + (k_eff - 1) * self.j, self.j * s, self.c + ((k_eff - 1) / 2 - p) * self.j)

    def spanning(self, n: int) -> "Field":
        """The field of a unit that sees all ``n`` positions of a map with this field."""
        return Field(self.r + (n - 1) * self.j, self.j * n, self.c + (n - 1) / 2 * self.j)


def union(fields: list[Field]) -> Field:
    lo = min(f.c - f.r / 2 for f in fields)
    hi = max(f.c + f.r / 2 for f in fields)
    return Field(hi - lo, max(f.j for f in fields), (lo + hi) / 2)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass
class LayerRow:
    name: str  # module path, e.g. "features.0"
    type: str  # class name, e.g. "Conv2d"
    output_shape: list[int]  # without the batch dimension
    params: int
    receptive_field: list[int] | None  # [height, width] in input pixels
    rf_stride: list[int] | None  # [height, width]: input pixels between neighbouring units

    def as_dict(self) -> dict:
        return asdict(self)


# tensor methods and torch functions that rearrange axes: after them "the last two axes" may mean anything
REARRANGING = {"permute", "transpose", "view", "reshape", "movedim", "moveaxis", "swapaxes", "swapdims", "unflatten",
               "flatten", "expand", "t", "unfold", "view_as", "reshape_as", "squeeze", "unsqueeze"}


def _rearranges(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in REARRANGING
    return node.op == "call_function" and getattr(node.target, "__name__", "") in REARRANGING


def receptive_fields(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[Field, Field] | None]:
    """Theoretical receptive field of the output of every module called in ``model``'s traced graph
    (None where the axes were rearranged on the way, see the module docstring)."""
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    fields: dict[torch.fx.Node, tuple[Field, Field] | None] = {}
    out: dict[str, tuple[Field, Field] | None] = {}

    def spatial(node) -> tuple[int, int] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        shape = getattr(meta, "shape", None)
        return tuple(shape[-2:]) if shape is not None and len(shape) == 4 else None

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            fields[node] = (Field(1, 1, 0), Field(1, 1, 0))
            continue
        inputs = [a for a in node.all_input_nodes if a in fields]
        if not inputs:
            continue
        meta = node.meta.get("tensor_meta")
        ndim = len(meta.shape) if hasattr(meta, "shape") else 0
        if any(fields[a] is None for a in inputs) or (_rearranges(node) and ndim >= 3):
            fields[node] = None
            if node.op == "call_module" and node.target not in out:
                out[node.target] = None
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        src = inputs[0]
        fh, fw = fields[src]
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = (_pair(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
            d = _pair(getattr(module, "dilation", 1))
            new = (fh.through(k[0], s[0], p[0], d[0]), fw.through(k[1], s[1], p[1], d[1]))
        elif spatial(node) is not None and all(spatial(a) == spatial(node) for a in inputs):
            new = (union([fields[a][0] for a in inputs]), union([fields[a][1] for a in inputs]))
        elif spatial(node) is not None and spatial(src) is not None:
            # a resampling we have no formula for (adaptive pooling): approximate it as a pooling
            (hi, wi), (ho, wo) = spatial(src), spatial(node)
            new = (fh.through(-(-hi // ho), hi // ho, 0), fw.through(-(-wi // wo), wi // wo, 0))
        else:
            # the output mixes every position of every input (flatten, linear, global pooling)
            parts = []
            for a in inputs:
                size = spatial(a)
                ah, aw = fields[a]
                parts.append((ah.spanning(size[0]), aw.spanning(size[1])) if size else (ah, aw))
            new = (union([p[0] for p in parts]), union([p[1] for p in parts]))
        fields[node] = new
        if node.op == "call_module" and node.target not in out:
            out[node.target] = new
    return out


def layer_table(model: nn.Module, channels: int, image_size: int) -> list[LayerRow]:
    """One row per leaf module in call order, for an input of shape ``(1, channels, image_size, image_size)``."""
    example = torch.zeros(1, channels, image_size, image_size)
    shapes: dict[str, list[int]] = {}
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module, _inputs, output):
        name = names[module]
        if name not in shapes and isinstance(output, torch.Tensor):
            shapes[name] = list(output.shape[1:])
            order.append(name)

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    try:
        fields = receptive_fields(model, example)
    except Exception:  # models that fx cannot trace still get their table, without fields
        fields = {}
    modules = dict(model.named_modules())
    rows = []
    for name in order:
        m = modules[name]
        f = fields.get(name)
        rows.append(
            LayerRow(
                name=name,
                type=type(m).__name__,
                output_shape=shapes[name],
                params=sum(p.numel() for p in m.parameters(recurse=False)),
                receptive_field=[round(f[0].r), round(f[1].r)] if f else None,
                rf_stride=[round(f[0].j), round(f[1].j)] if f else None,
            )
        )
    return rows


def format_table(rows: list[LayerRow], model: nn.Module) -> str:
    """The table in the lecture's layout, with the receptive field columns added."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts: dict[str, int] = {}
    header = f"{'Layer (type)':>28} {'Module':>24} {'Output Shape':>22} {'Param #':>14} {'RF':>9} {'RF stride':>9}"
    lines = ["-" * len(header), header, "=" * len(header)]
    for i, r in enumerate(rows, 1):
        counts[r.type] = counts.get(r.type, 0) + 1
        shape = "[-1, " + ", ".join(map(str, r.output_shape)) + "]"
        rf = f"{r.receptive_field[0]}x{r.receptive_field[1]}" if r.receptive_field else "-"
        st = f"{r.rf_stride[0]}x{r.rf_stride[1]}" if r.rf_stride else "-"
        lines.append(f"{r.type + '-' + str(i):>28} {r.name:>24} {shape:>22} {r.params:>14,} {rf:>9} {st:>9}")
    lines += [
        "=" * len(header),
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        "-" * len(header),
    ]
    return "\n".join(lines)
