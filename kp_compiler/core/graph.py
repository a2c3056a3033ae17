"""Graph utilities every pass leans on: metadata, snapshots, aliasing facts.

Nothing here knows about a particular rewrite. Passes import these helpers to
prove their preconditions (same shape and dtype, no mutation through an
alias, not turning a graph output into an alias of an input).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def val(node: Any) -> Any:
    """The fake value (tensor, SymInt, tuple, ...) recorded on a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val")


@contextlib.contextmanager
def fake_execution(fake_mode) -> Iterator[None]:
    """Run ops on fake tensors the way Dynamo and ``make_fx`` do: under ``fake_mode`` with the Python dispatcher.

    Without the Python dispatcher a composite op runs its C++ decomposition,
    some of which read a symbolic size as a number (``aten.linear`` on CUDA,
    ``aten.pad`` anywhere): each such read adds a guard (``Eq(s0, 3)``) and
    Dynamo recompiles the graph for every new size. The Python decompositions
    keep sizes symbolic.
    """
    with fake_mode, enable_python_dispatcher():
        yield


def propagate_shapes(gm: fx.GraphModule, fake_mode, fake_inputs: Sequence[Any]) -> None:
    """Recompute ``meta["val"]`` for every node; raises if the graph is ill-typed."""
    with enable_python_dispatcher():
        _ConstantsAsFake(gm, mode=fake_mode).propagate_dont_convert_inputs(*fake_inputs)


class _ConstantsAsFake(FakeTensorProp):
    """FakeTensorProp that also fakes the module's own tensors (a pass's buffers, e.g. a block mask)."""

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


def snapshot(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm.graph`` (node metadata included) to restore on rollback."""
    copy = fx.Graph(owning_module=gm)
    val_map: dict = {}
    out = copy.graph_copy(gm.graph, val_map)
    copy.output(out)
    for old, new in val_map.items():
        # Dynamo's input sources live on the Node object, not in meta (AOTAutograd reads them).
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


def restore(gm: fx.GraphModule, graph: fx.Graph) -> None:
    gm.graph = graph
    gm.recompile()


def fingerprint(graph: fx.Graph) -> tuple:
    """A cheap identity of the graph: changes whenever a node, target, edge or literal argument does
    (``x * 2.0`` edited in place to ``x * 2.002`` counts: the pass manager then checks the graph)."""
    return tuple((id(n), n.op, n.target, _literal(n.args), _literal(n.kwargs)) for n in graph.nodes)


def _literal(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return ("%", id(a))
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *(_literal(x) for x in a))
    if isinstance(a, dict):
        return ("dict", *((k, _literal(v)) for k, v in a.items()))
    if isinstance(a, float) and a != a:  # NaN: equal to itself here
        return ("nan",)
    return (type(a).__name__, a) if isinstance(a, (bool, int, float, str, type(None))) else ("repr", repr(a))


def output_signature(graph: fx.Graph) -> list[str]:
    """The graph outputs as the user sees them: dtype, shape and device per tensor (``None`` where unknown)."""
    (out,) = [n for n in graph.nodes if n.op == "output"]
    leaves = pytree.tree_leaves(out.args[0], is_leaf=lambda x: isinstance(x, fx.Node))
    sig = []
    for leaf in leaves:
        v = val(leaf) if isinstance(leaf, fx.Node) else leaf
        if isinstance(v, torch.Tensor):
            sig.append(f"{v.dtype}{list(v.shape)}@{v.device.type}")
        else:
            sig.append(type(v).__name__ if not isinstance(v, (int, float, bool)) else repr(v))
    return sig


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shapes provably equal, symbolic sizes included; never adds a guard."""
    if a.dim() != b.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def same_tensor_meta(a: Any, b: Any) -> bool:
    """Both nodes hold tensors of provably the same shape, dtype and device."""
    va, vb = val(a), val(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return va.dtype == vb.dtype and va.device == vb.device and same_shape(va, vb)


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None)


def is_mutating(node: fx.Node) -> bool:
    """True for in-place and ``out=`` ops (any argument written to)."""
    if node.op != "call_function":
        return False
    schema = _schema(node)
    if schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _mutated_args(node: fx.Node) -> Iterable[fx.Node]:
    schema = _schema(node)
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            yield value


def _is_view(node: fx.Node) -> bool:
    schema = _schema(node)
    if schema is None or not schema.returns:
        return False
    ret = schema.returns[0].alias_info
    return ret is not None and not ret.is_write


class AliasFacts:
    """Which nodes may share storage with a tensor that the graph mutates.

    Views (ops whose schema returns an alias of an input) join their input's
    alias class; a class is "mutated" if any member is written by an in-place
    or ``out=`` op. Forwarding one value in place of another is only safe when
    neither lies in a mutated class.
    """

    def __init__(self, graph: fx.Graph):
        self._parent: dict[fx.Node, fx.Node] = {}
        mutated = []
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
                self._union(node, node.args[0])
            if is_mutating(node):
                mutated.extend(_mutated_args(node))
                self._union(node, *list(_mutated_args(node))[:1])
        self._mutated = {self._find(n) for n in mutated}
        self._inputs = {self._find(n) for n in graph.nodes if n.op in ("placeholder", "get_attr")}

    def _find(self, n: fx.Node) -> fx.Node:
        while self._parent.get(n, n) is not n:
            n = self._parent[n]
        return n

    def _union(self, a: fx.Node, *others: fx.Node) -> None:
        for b in others:
            ra, rb = self._find(a), self._find(b)
            if ra is not rb:
                self._parent[ra] = rb

    def is_mutated(self, node: fx.Node) -> bool:
        return self._find(node) in self._mutated

    def aliases_input(self, node: fx.Node) -> bool:
        """``node`` is, or is a view of, a graph input or a module attribute."""
        return self._find(node) in self._inputs


def feeds_output(node: fx.Node) -> bool:
    return any(u.op == "output" for u in node.users)


def can_forward(root: fx.Node, value: fx.Node, aliases: AliasFacts) -> bool:
    """May uses of ``root`` read ``value`` instead?

    Requires provably equal shape, dtype and device, no mutation through either
    value's aliases, and never makes a graph output alias a graph input (a
    user mutating the output would then write to their input).
    """
    if not same_tensor_meta(root, value):
        return False
    if aliases.is_mutated(root) or aliases.is_mutated(value):
        return False
    return not (feeds_output(root) and aliases.aliases_input(value))


def alive(node: fx.Node) -> bool:
    """``node`` is still in its graph (not erased), through FX's public node index only."""
    try:
        return any(n is node for n in node.graph.find_nodes(op=node.op, target=node.target))
    except TypeError:  # an unhashable target is not indexed: walk the graph
        return any(n is node for n in node.graph.nodes)


def drop_input(node: fx.Node) -> None:
    """Remove the placeholder ``node``, which nothing reads, from its graph: a change of the graph's calling
    convention, for a caller that also drops the matching argument (a checkpoint body's unused input)."""
    if node.op != "placeholder" or node.users:
        raise ValueError(f"{node.name} is not an unused placeholder")
    node.graph.erase_node(node)


def erase_dead(nodes: Iterable[fx.Node]) -> set:
    """Erase the replaced ``nodes`` nothing uses any more, then what only they kept alive; return the erased.

    The project's one dead-code eraser. The listed nodes go once unused,
    whatever they are (the caller replaced them: a random op such as dropout,
    or an in-place op into a buffer nothing reads any more); they are taken
    users first, so a chain goes in one call. Their inputs follow only when
    unused, pure and not in-place. Only ``call_function`` nodes are erased, and
    listed ``call_method`` nodes (a Dynamo graph's ``x.to_local()``): a
    placeholder is part of the graph's calling convention.
    """
    listed = dict.fromkeys(n for n in nodes if isinstance(n, fx.Node) and n.op in ("call_function", "call_method"))
    pending = [n for n in listed if alive(n)]
    gone: set = set()
    inputs: list = []
    while pending:
        dead = [n for n in pending if not n.users]
        if not dead:
            break
        for n in dead:
            inputs.extend(n.all_input_nodes)
            n.graph.erase_node(n)
            gone.add(n)
        pending = [n for n in pending if n not in gone]
    while inputs:
        n = inputs.pop()
        if n in gone or n.users or n.op != "call_function" or n.is_impure() or is_mutating(n):
            continue
        inputs.extend(n.all_input_nodes)
        n.graph.erase_node(n)
        gone.add(n)
    return gone
