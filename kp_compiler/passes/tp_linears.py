"""Tensor-parallel linears computed on their local shards, so the passes reach them (issue 21).

Under ``parallelize_module`` Dynamo captures each sharded linear as a chain of
DTensor calls, which canonicalization cannot trace (``core/plain_regions.py``
keeps them as captured). ``localize`` rewrites the two chains torch's
``ColwiseParallel`` and ``RowwiseParallel`` emit into ``linear`` on plain local
tensors plus ``kp::tp_copy`` / ``kp::tp_reduce`` (``ops/tp_collectives.py``)
for what ``DTensor`` communicated, and reads each weight's local shard once,
before the graph's first computation. The rest of the graph is then one part
on plain tensors, and every pass (attention, FP8, linear + activation) sees
the linears as ordinary ones.

It fires only where the example values prove the chain (1-D mesh, the
weight's mesh; nothing else reads an intermediate):

- column-parallel: ``from_local(x, [Replicate()], run_check=False)`` ->
  ``linear(., W: Shard(0), b: Shard(0) | None)`` -> ``redistribute`` to the
  output's own ``Shard(-1)`` (no communication) -> ``to_local()``. Local:
  ``linear(tp_copy(x), W_local, b_local)``; columns that read one ``x`` share
  its ``tp_copy``, so q, k and v all-reduce their input gradient once, not
  three times. Redistributed to ``Replicate()`` instead (``output_layouts=
  Replicate()``: an LM head gathered whole), the local linear ends in
  ``kp::tp_all_gather`` over the columns (the weight's rows must split evenly).
- row-parallel: ``from_local(h, [Shard(-1)], run_check=False)`` ->
  ``linear(., W: Shard(1), b: Replicate() | None)`` (a ``Partial`` sum) ->
  ``redistribute`` to ``Replicate()`` -> ``to_local()``. Local:
  ``tp_reduce(linear(h, W_local)) + b_local``.
- sequence parallelism (torchtitan's plan: ``SequenceParallel`` norms,
  ``PrepareModuleInput`` gathers, ``RowwiseParallel(output_layouts=Shard(1))``):
  a column-parallel linear whose input is a ``redistribute`` of a DTensor
  split over tokens (``Shard(d)``, ``d`` not the last dimension) to
  ``Replicate()`` reads ``kp::sp_all_gather`` of that DTensor's local shard
  instead (every reader of the gather must be proven; they share it), and a
  row-parallel linear redistributed to ``Shard(d)`` ends in
  ``kp::sp_reduce_scatter``. The token dimension's global size must be static
  and a multiple of the mesh's size. The norms between stay DTensor ops.

Before (rank 0 of 2, torch 2.13's spelling; torch 2.9 bakes the constants into
``prim`` functions, read the same way)::

    %input_tensor_7 = DTensor.from_local(%ln2, %mesh, (Replicate(),), run_check=False)
    %linear_4 = torch._C._nn.linear(%input_tensor_7, %fc1_weight, %fc1_bias)        # DTensor
    %outputs_4 = %linear_4.redistribute(placements=(Shard(dim=-1),), async_op=True)
    %hook_result_4 = %outputs_4.to_local()
    %gelu = torch._C._nn.gelu(%hook_result_4, approximate='tanh')
    %input_tensor_9 = DTensor.from_local(%gelu, %mesh, (Shard(dim=-1),), run_check=False)
    %linear_5 = torch._C._nn.linear(%input_tensor_9, %fc2_weight, %fc2_bias)        # Partial(sum)
    %outputs_5 = %linear_5.redistribute(placements=(Replicate(),), async_op=True)
    %hook_result_5 = %outputs_5.to_local()

After::

    %fc1_weight_tp_local = %fc1_weight.to_local()      # ... every weight's and bias's, after the inputs
    %tp_copy = kp.tp_copy(%ln2, '0')
    %linear_local = torch._C._nn.linear(%tp_copy, %fc1_weight_tp_local, %fc1_bias_tp_local)
    %gelu = torch._C._nn.gelu(%linear_local, approximate='tanh')
    %linear_local_1 = torch._C._nn.linear(%gelu, %fc2_weight_tp_local)
    %tp_reduce = kp.tp_reduce(%linear_local_1, '0')
    %add = operator.add(%tp_reduce, %fc2_bias_tp_local)
"""

from __future__ import annotations

from typing import Optional

import sympy
import torch
import torch.nn.functional as F
from torch import fx

from ..core.plain_regions import dtensor_type, example_value
from ..core.row_axis import expr_of
from .tp_checkpoints import localize_bodies
from .tp_rewrite import Localized, rewrite

__all__ = ["Localized", "dt_call", "localize"]

_PRIM = {"prim from_local": "from_local", "prim_redistribute": "redistribute", "prim_to_local": "to_local"}


def dt_call(node: fx.Node) -> Optional[tuple[str, tuple, dict]]:
    """``(kind, constant args after the tensor, kwargs)`` of a DTensor API call (``from_local``,
    ``redistribute``, ``to_local``) in either of Dynamo's spellings, or None."""
    if node.op == "call_method" and node.target in ("redistribute", "to_local"):
        return node.target, tuple(node.args[1:]), dict(node.kwargs)
    if node.op != "call_function":
        return None
    if node.target is getattr(dtensor_type(), "from_local", None):
        return "from_local", tuple(node.args[1:]), dict(node.kwargs)
    kind = _PRIM.get(getattr(node.target, "__name__", ""))
    code, cells = getattr(node.target, "__code__", None), getattr(node.target, "__closure__", None)
    if kind is None or code is None or cells is None:
        return None
    free = dict(zip(code.co_freevars, (c.cell_contents for c in cells)))
    if "args_as_value" not in free or "kwargs_as_value" not in free:
        return None
    return kind, tuple(free["args_as_value"]), {**free["kwargs_as_value"], **node.kwargs}


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _placements(node) -> Optional[tuple]:
    value = example_value(node)
    return tuple(value.placements) if isinstance(value, dtensor_type()) else None


def _is_shard(p, dim: int, ndim: int) -> bool:
    return p.is_shard() and p.dim % ndim == dim % ndim


def _mesh_of(start: tuple, given: dict):
    """The mesh a ``from_local`` call names (torch 2.13 passes it as a graph input, torch 2.9 bakes it in)."""
    args, kwargs = start[1], start[2]
    mesh = args[0] if args else kwargs.get("device_mesh")
    return given.get(mesh.name, example_value(mesh)) if isinstance(mesh, fx.Node) else mesh


def _token_dim(placements, node, mesh) -> Optional[int]:
    """``d`` where ``placements`` is ``(Shard(d),)`` over a dimension other than the last (sequence
    parallelism: the tokens split over the ranks), the global size of ``d`` static and a multiple of the
    mesh's size (the collectives move equal shards); else None."""
    value = example_value(node)
    if placements is None or len(placements) != 1 or not placements[0].is_shard():
        return None
    d = placements[0].dim % value.dim()
    size = value.shape[d]
    if d == value.dim() - 1 or not isinstance(size, int) or size % mesh.size():
        return None
    return d


def _noop_redistribute(node: fx.Node) -> Optional[fx.Node]:
    """The input of ``node`` where ``node`` redistributes a DTensor to the placements it already has (no
    communication: transformers' row-parallel input does), else None."""
    call = dt_call(node)
    if call is None or call[0] != "redistribute" or call[1] or not set(call[2]) <= _REDISTRIBUTE_KWARGS:
        return None
    src = node.args[0]
    same = isinstance(src, fx.Node) and _placements(src) is not None and _placements(src) == _placements(node)
    return src if same else None


def _default_layout(start: tuple, node: fx.Node, mesh) -> bool:
    """Whether a ``from_local``'s explicit ``shape``/``stride`` (transformers passes them) are what it infers
    without them: the global shape of even shards, contiguous. Symbolic sizes (``dynamic=True``: the graph's
    SymInt inputs and sizes computed from them) are compared as expressions, which adds no guard."""
    kwargs = start[2]
    if not {"shape", "stride"} & kwargs.keys():
        return True
    local, dt = example_value(node.args[0]), example_value(node)
    if not (isinstance(local, torch.Tensor) and isinstance(dt, dtensor_type())):
        return False
    inferred = [expr_of(s) for s in local.shape]
    for p in dt.placements:
        if p.is_shard():
            inferred[p.dim % local.dim()] *= mesh.size()
    contiguous = [sympy.Mul(*inferred[i + 1:]) for i in range(len(inferred))]
    shape, stride = (_sizes(kwargs.get(k)) for k in ("shape", "stride"))
    return all(given is None or _same(given, want) for given, want in ((shape, inferred), (stride, contiguous)))


def _sizes(given) -> Optional[list]:
    """A ``shape``/``stride`` argument's entries as sympy expressions (graph nodes read through their example
    values); None where the argument is not given; ``[None]`` where an entry is not a size."""
    if given is None:
        return None
    if isinstance(given, fx.Node):  # a whole size tuple computed in the graph (``x.shape``)
        given = example_value(given)
    if not isinstance(given, (list, tuple)):
        return [None]
    values = [example_value(g) if isinstance(g, fx.Node) else g for g in given]
    return [expr_of(v) if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) else None for v in values]


def _same(given: list, want: list) -> bool:
    return len(given) == len(want) and all(g is not None and sympy.expand(g - w) == 0 for g, w in zip(given, want))


def _input_side(source, link: fx.Node, mesh, given: dict) -> tuple[Optional[dict], str]:
    """How a linear's input is made: ``{"copy": x, "via": [from_local, ...]}`` (``from_local`` of a plain tensor
    that only this linear reads, maybe through a redistribute to its own placements) or ``{"gather": (src, d)}``
    (a ``redistribute`` of ``src``, sharded over tokens, to ``Replicate``: sequence parallelism; every reader
    must be proven, which ``localize`` checks)."""
    via = []
    while isinstance(source, fx.Node) and _only_user(source) is (via[-1] if via else link):
        inner = _noop_redistribute(source)
        if inner is None:
            break
        via.append(source)
        source = inner
    start = dt_call(source) if isinstance(source, fx.Node) else None
    if start is not None and start[0] == "from_local":
        if _only_user(source) is not (via[-1] if via else link):
            return None, "its from_local input has other readers"
        checking = start[2].get("run_check", True) is not False or not _default_layout(start, source, mesh)
        if _mesh_of(start, given) != mesh or checking:
            return None, "from_local is not on the weight's mesh with run_check=False (and its default layout)"
        return {"copy": source.args[0], "via": [source, *via]}, ""
    if start is not None and start[0] == "redistribute" and not start[1] and set(start[2]) <= _REDISTRIBUTE_KWARGS:
        src = source.args[0]
        value = example_value(src)
        if isinstance(value, dtensor_type()) and value.device_mesh == mesh:
            d = _token_dim(_placements(src), src, mesh)
            if d is not None:
                return {"gather": (src, d)}, ""
    return None, "its input is neither a from_local nor a gather of a token-sharded DTensor"


_REDISTRIBUTE_KWARGS = {"placements", "async_op", "device_mesh"}


def _chain(link: fx.Node, given: dict) -> tuple[Optional[dict], str]:
    """The chain whose ``linear`` is ``link``: ``({kind, x | gather, w, b, out, scatter, nodes, mesh}, "")`` or
    ``(None, why)``. ``given``: the graph's example inputs by placeholder name."""
    from torch.distributed.tensor import Replicate

    args = list(link.args) + [link.kwargs.get("bias")] * (3 - len(link.args))
    source, w, b = args[:3]
    wv = example_value(w)
    if not (w.op == "placeholder" and isinstance(wv, dtensor_type()) and wv.dim() == 2 and wv.device_mesh.ndim == 1):
        return None, "the weight is not a 2-D DTensor parameter on a 1-D mesh"
    mesh = wv.device_mesh
    redistribute = _only_user(link)
    step = dt_call(redistribute) if redistribute is not None else None
    if step is None or step[0] != "redistribute" or not set(step[2]) <= _REDISTRIBUTE_KWARGS:
        return None, "its output is not only redistributed"
    end = _only_user(redistribute)
    last = dt_call(end) if end is not None else None
    if last is None or last[0] != "to_local" or last[1] or any(v is not None for v in last[2].values()):
        return None, "the redistributed output is not only read by to_local()"
    ndim = example_value(source).dim()
    x_in, w_at, out, after = _placements(source), _placements(w), _placements(link), _placements(redistribute)
    b_at = _placements(b) if isinstance(b, fx.Node) else ()
    if b is not None and (not isinstance(b, fx.Node) or b.op != "placeholder" or b_at is None):
        return None, "the bias is not a DTensor parameter"
    chain = {"w": w, "b": b, "out": end, "nodes": [end, redistribute, link], "mesh": mesh, "scatter": None}
    if (x_in == (Replicate(),) and _is_shard(w_at[0], 0, 2) and len(out) == 1 and _is_shard(out[0], -1, ndim)
            and after in (out, (Replicate(),)) and (b is None or _is_shard(b_at[0], 0, 1))):
        gathered = after == (Replicate(),)  # the output all-gathered whole (an LM head every rank needs)
        if gathered and (not isinstance(wv.shape[0], int) or wv.shape[0] % mesh.size()):
            return None, f"its gathered output's {wv.shape[0]} columns do not split evenly over {mesh.size()} ranks"
        side, why = _input_side(source, link, mesh, given)
        if side is None:
            return None, why
        if "copy" in side:
            chain["nodes"] += side["via"]
        return {**chain, **side, "source": side["via"][0] if "via" in side else source, "kind": "colwise",
                "gather_out": gathered}, ""
    partial = out is not None and len(out) == 1 and out[0].is_partial() and getattr(out[0], "reduce_op", "") == "sum"
    if (len(x_in) == 1 and _is_shard(x_in[0], -1, ndim) and _is_shard(w_at[0], 1, 2) and partial
            and (b is None or b_at == (Replicate(),))):
        side, why = _input_side(source, link, mesh, given)
        if side is None or "copy" not in side:
            return None, why or "its input is not a from_local"
        chain["nodes"] += side["via"]  # its input is read when the chain is rewritten (tp_rewrite.py)
        if after == (Replicate(),):
            return {**chain, "kind": "rowwise"}, ""
        d = _token_dim(after, redistribute, mesh)
        if d is not None:
            return {**chain, "kind": "rowwise", "scatter": d}, ""
    return None, f"placements {x_in} x {w_at} -> {out} -> {after} are not a column- or row-parallel linear"


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear)


def localize(gm: fx.GraphModule, example_inputs) -> Localized:
    """A copy of ``gm`` with every proven column- and row-parallel linear computed locally (``.gm``, None where
    there is none), and why each other DTensor linear stays a DTensor op (``.kept``)."""
    graph = fx.Graph()
    remap: dict = {}
    out = graph.graph_copy(gm.graph, remap)
    graph.output(out)
    given = {ph.name: x for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)}
    result = Localized(fx.GraphModule(gm, graph))
    result.gm.meta.update(gm.meta)
    chains = []
    for node in list(graph.nodes):
        if not _is_linear(node) or not isinstance(example_value(node), dtensor_type()):
            continue
        chain, why = _chain(node, given)
        if chain is None:
            result.kept.append(f"{node.name}: {why}")
        else:
            chains.append(chain)
    chains = _whole_gathers(chains, result)
    if chains:
        result.colwise, result.rowwise, result.copies, result.scatters = rewrite(graph, chains)
    bodies = localize_bodies(result.gm, given, result, localize)  # activation-checkpointed blocks
    if not chains and not bodies:
        result.gm = None
        return result
    graph.lint()
    result.gm.recompile()
    return result


def _whole_gathers(chains: list, result: Localized) -> list:
    """The chains less those reading a sequence-parallel gather that some other reader of it keeps as a DTensor
    op (the gather must then stay one)."""
    readers: dict = {}
    for chain in chains:
        if "gather" in chain:
            readers.setdefault(chain["source"], []).append(chain)
    partial = {source for source, found in readers.items() if len(found) != len(source.users)}
    for source in partial:
        result.kept.append(f"{source.name}: a sequence-parallel gather with readers other than proven "
                           "column-parallel linears")
    return [c for c in chains if c.get("source") not in partial]
