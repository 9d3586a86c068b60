"""A saved ``torch.export`` program (``.pt2``) as a torch module the quantizer can calibrate.

``ExportedProgram.module()`` calls ``aten.conv2d`` / ``aten.linear`` on its parameters: there
are no ``nn.Conv2d`` / ``nn.Linear`` modules for calibration to find. :func:`to_torch` turns
each of those calls whose weight (and bias) are parameters of the program into a call of a
module holding those very tensors, drops the program's input guards (calibration runs other
batch sizes; a batch fixed in the program runs in chunks of it), and returns a plain
``torch.fx.GraphModule``; the compiler imports that same module through ``torch.export``, so
the plan finds its layers by their weights.
"""

from __future__ import annotations

from pathlib import Path


def load(path):
    """The ``ExportedProgram`` saved at ``path``, or one line saying why not."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}" if not path.exists()
                                else f"{path}: is a directory, not a .pt2 file")
    try:
        return torch.export.load(str(path))
    except Exception as e:  # torch raises zipfile / pickle / runtime errors alike
        raise ValueError(f"{path}: not a torch.export program (.pt2) that torch "
                         f"{torch.__version__} can load ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def static_batch(ep) -> int | None:
    """The batch size the program's first input is fixed to, or None when it is dynamic."""
    import torch

    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            node = next(n for n in ep.graph.nodes if n.op == "placeholder"
                        and n.name == spec.arg.name)
            val = node.meta.get("val")
            if val is None or not val.dim():
                return None
            d = val.shape[0]
            return int(d) if isinstance(d, int) or not isinstance(d, torch.SymInt) else None
    return None


def to_torch(ep):
    """The calibration / compile module of ``ep`` (see the module docstring)."""
    import torch
    import torch.fx as fx
    from torch import nn

    from .onnx_torch import chunked

    gm = ep.module()
    aten = torch.ops.aten
    params = dict(gm.named_parameters())
    graph = gm.graph
    for i, node in enumerate(list(graph.nodes)):
        if node.op == "call_module" and not node.users:  # the input guards
            graph.erase_node(node)
            continue
        if node.op != "call_function" or node.target not in (aten.conv2d.default,
                                                              aten.linear.default):
            continue
        conv = node.target is aten.conv2d.default
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        w, b = bound.get("weight"), bound.get("bias")
        if getattr(w, "op", None) != "get_attr" or w.target not in params or (
                b is not None and (getattr(b, "op", None) != "get_attr" or b.target not in params)):
            continue
        weight = params[w.target]
        if conv:
            if weight.dim() != 4:
                continue
            m = nn.Conv2d(weight.shape[1] * int(bound.get("groups", 1)), weight.shape[0],
                          tuple(weight.shape[2:]), stride=tuple(bound.get("stride", (1, 1))),
                          padding=tuple(bound.get("padding", (0, 0))),
                          dilation=tuple(bound.get("dilation", (1, 1))),
                          groups=int(bound.get("groups", 1)), bias=b is not None)
        else:
            m = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        m.weight = weight  # the program's own tensors
        if b is not None:
            m.bias = params[b.target]
        key = f"{node.name}_{i}"
        gm.add_submodule(f"flexiq_layers.{key}", m)
        with graph.inserting_before(node):
            new = graph.call_module(f"flexiq_layers.{key}", (bound["input"],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    out = fx.GraphModule(gm, graph).eval()  # a plain GraphModule: eval() works
    batch = static_batch(ep)
    return out if batch is None else chunked(out, batch)
