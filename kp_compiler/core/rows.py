"""Row independence along a padded dimension: may a graph run on inputs padded along the batch?

CUDA-graph bucketing (issue 18) replays a graph captured for a larger batch
with the real rows padded out to it. That is safe only if every output row
depends on the same input row alone along the padded dimension: no reduction,
sort, cumulative op, normalisation, attention or random numbers across it, and
the batch size never used as a value. ``prove_rows(graph, symbol)`` follows
each tensor's *batch axis* (the dim whose index is the batch row, outermost in
its dim when merged with inner dims: ``[B, S, d] -> [B*S, d]`` keeps it) from
the inputs whose shapes hold ``symbol`` to the outputs, op by op, and answers
with the first node that breaks it and why::

    %x = input() : f32[s0, 16]                   axis 0
    %linear = aten.linear.default(%x, %w, %b)    axis 0 (w, b hold no batch rows)
    %mean = aten.mean.dim(%linear, [0])          broken: "reduces over the batch axis"

A tensor holding no batch rows (parameters, constants) is ``FREE``; a
factory sized by the batch (``zeros``, ``arange(s0)``) holds the same values in
every real row whatever the padding, so it carries the axis too. An op not in
the tables below is not proven: ``RowProof.ok`` is False and ``reason`` names it
(correctness before coverage).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch
from torch import fx

from .graph import val
from .row_axis import FREE, Broken, axis_of, expr_of, holds, op_name
from .row_rules import RULES

aten = torch.ops.aten



@dataclass
class RowProof:
    ok: bool
    reason: str = ""
    node: Optional[str] = None
    inputs: list = field(default_factory=list)   # per placeholder: its batch axis, or None
    outputs: list = field(default_factory=list)  # per graph output: its batch axis, or None
    sizes: list = field(default_factory=list)    # placeholders that are the batch size itself (Dynamo passes it)
    unit: list = field(default_factory=list)     # tensor inputs whose batch dim is exactly the batch size
    max_batch: Optional[int] = None              # the largest batch the graph was compiled for (its range)


def _tensors(args) -> list:
    out = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors(a))
    return out


POINTWISE = {
    "add", "sub", "mul", "div", "neg", "exp", "exp2", "expm1", "log", "log1p", "log2", "tanh", "sigmoid", "silu",
    "gelu", "relu", "pow", "rsqrt", "sqrt", "where", "clamp", "clamp_min", "clamp_max", "_to_copy", "to", "abs",
    "maximum", "minimum", "eq", "ne", "lt", "gt", "le", "ge", "logical_and", "logical_or", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_not", "erf", "sin", "cos", "masked_fill", "clone", "contiguous",
    "detach", "alias", "softplus", "leaky_relu", "hardtanh", "reciprocal", "sign", "floor", "ceil", "round",
    "trunc", "remainder", "fmod", "square", "hardswish", "hardsigmoid", "mish", "elu", "copy", "lerp", "addcmul",
    "addcdiv", "type_as", "lift_fresh_copy", "nan_to_num", "isnan", "isinf", "threshold", "sigmoid_backward",
    "silu_backward", "gelu_backward", "tanh_backward", "threshold_backward",
}
# reductions and scans over the dims they are given: safe unless one of them is the batch axis
OVER_DIMS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "any", "all", "prod", "var", "std",
             "logsumexp", "norm", "linalg_vector_norm", "var_mean", "std_mean", "_softmax", "softmax",
             "_log_softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "sort", "argsort", "topk"}
RANDOM = {"rand", "randn", "rand_like", "randn_like", "randint", "bernoulli", "native_dropout", "uniform",
          "normal", "multinomial", "randperm"}
# argument names that may hold the batch size: size lists (``SymInt[]``), and the ends the rules check
SIZE_ARGS = {"size", "shape", "sizes", "stride", "repeats", "split_sizes", "split_size", "normalized_shape"}
SIZE_SCALARS = {("arange", "end"), ("slice", "end"), ("narrow", "length")}
SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten._assert_scalar.default,
              aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default,
              aten._assert_tensor_metadata.default}


class _Prover:
    def __init__(self, symbol):
        self.symbol = symbol
        self.state: dict = {}    # node -> axis / FREE, or a tuple of those for tuple outputs
        self.tainted: set = set()  # scalar nodes whose value depends on the batch size

    def axis(self, node: fx.Node, a) -> Optional[int]:
        return self.state.get(a) if isinstance(a, fx.Node) else FREE

    def out_axis(self, node: fx.Node) -> Optional[int]:
        v = val(node)
        return axis_of(v, self.symbol, node) if isinstance(v, torch.Tensor) else FREE

    def check_scalars(self, node: fx.Node, args) -> None:
        for a in args:
            if isinstance(a, fx.Node) and a in self.tainted:
                raise Broken(node, f"uses {a.name}, a value computed from the batch size")
            if isinstance(a, (list, tuple)):
                self.check_scalars(node, a)

    def check_scalar_args(self, node: fx.Node) -> None:
        """A value computed from the batch size may only be a size (a ``SymInt[]`` size list, or the end of an
        ``arange``, ``slice`` or ``narrow``, which the rules check); used as anything else it changes with the
        padding."""
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            self.check_scalars(node, list(node.args) + list(node.kwargs.values()))
            return
        for i, arg in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if not self._tainted(value):
                continue
            if arg.name in SIZE_ARGS and isinstance(arg.type, torch.ListType):
                continue
            if (op_name(node.target), arg.name) in SIZE_SCALARS:
                continue
            raise Broken(node, f"uses a value computed from the batch size as {arg.name!r}")

    def _tainted(self, value) -> bool:
        if isinstance(value, fx.Node):
            return value in self.tainted
        return isinstance(value, (list, tuple)) and any(self._tainted(v) for v in value)

    def check_writes(self, node: fx.Node) -> None:
        """An op writing into a graph input with batch rows: the write would land in the padded copy."""
        schema = getattr(node.target, "_schema", None)
        for i, arg in enumerate(getattr(schema, "arguments", ())):
            if arg.alias_info is None or not arg.alias_info.is_write or i >= len(node.args):
                continue
            base = _base(node.args[i])
            if base is not None and base.op == "placeholder" and self.state.get(base) is not FREE:
                raise Broken(node, f"writes into the input {base.name}, which holds batch rows")

    def run(self, graph: fx.Graph) -> RowProof:
        inputs, outputs, sizes, unit = [], [], [], []
        node = None
        try:
            for node in graph.nodes:
                if node.op == "placeholder":
                    v = val(node)
                    if isinstance(v, torch.Tensor):
                        self.state[node] = axis_of(v, self.symbol, node)
                        if self.state[node] is not FREE and expr_of(v.shape[self.state[node]]) == self.symbol:
                            unit.append(len(inputs))  # its batch dim is the batch size itself
                    elif isinstance(v, torch.SymInt) and holds(v, self.symbol):
                        if expr_of(v) != self.symbol:
                            raise Broken(node, f"an input size {v} computed from the batch size")
                        self.tainted.add(node)
                        sizes.append(len(inputs))
                    inputs.append(self.state.get(node))
                elif node.op == "output":
                    results = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
                    outputs = [self.axis(node, a) if isinstance(a, fx.Node) else FREE for a in results]
                    for a in _tensors(node.args[0]):
                        if a in self.tainted:
                            raise Broken(node, f"returns {a.name}, a value computed from the batch size")
                elif node.op == "call_function":
                    self.state[node] = self.step(node)
                elif node.op == "get_attr":
                    self.state[node] = FREE
                else:
                    raise Broken(node, f"{node.op} nodes are not analysed")
        except Broken as e:
            return RowProof(False, e.why, e.node.name, inputs)
        except Exception as e:  # noqa: BLE001 - a node the rules cannot read is not proven, never a crash
            return RowProof(False, f"could not be analysed ({type(e).__name__}: {e})", getattr(node, "name", None),
                            inputs)
        return RowProof(True, inputs=inputs, outputs=outputs, sizes=sizes, unit=unit, max_batch=self.max_batch(graph))

    def max_batch(self, graph: fx.Graph) -> Optional[int]:
        """The symbol's upper bound in the shape environment (a ``torch._check`` or guard can bound it), if any."""
        for node in graph.nodes:
            v = val(node)
            sizes = v.shape if isinstance(v, torch.Tensor) else [v] if isinstance(v, torch.SymInt) else []
            for size in sizes:
                if isinstance(size, torch.SymInt) and holds(size, self.symbol):
                    bound = size.node.shape_env.var_to_range[self.symbol].upper
                    try:
                        return int(bound)
                    except (TypeError, ValueError, OverflowError, AttributeError):  # unbounded (sympy's oo)
                        return None
        return None

    def step(self, node: fx.Node):
        t = node.target
        if t in SHAPE_ONLY:
            if t in (aten.sym_size.int, aten.sym_numel.default) and holds(val(node), self.symbol):
                self.tainted.add(node)
            elif t not in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int):
                self.check_scalars(node, node.args)  # an assert on the batch size: a bucket could break it
            return FREE
        if t is operator.getitem:
            parent = self.state.get(node.args[0])
            if isinstance(parent, tuple):
                return parent[node.args[1]]
            return self.out_axis(node)
        if t in (operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv, operator.mod,
                 operator.neg, operator.ge, operator.le, operator.lt, operator.gt, operator.eq, torch.sym_max,
                 torch.sym_min, torch.sym_sqrt, torch.sym_float, torch.sym_int):
            if any(isinstance(a, fx.Node) and a in self.tainted for a in node.args):
                self.tainted.add(node)
            return FREE
        name = op_name(t)
        ins = [a for a in _tensors(list(node.args) + list(node.kwargs.values()))
               if isinstance(val(a), torch.Tensor)]
        batched = [a for a in ins if self.state.get(a) is not FREE]
        if name == "dropout" and len(node.args) > 2 and not node.args[2]:
            return self.state.get(node.args[0])  # eval: the identity
        dropout_p = _argument(node, "dropout_p", default=True)
        seeded = torch.Tag.nondeterministic_seeded in getattr(t, "tags", ())
        if name in RANDOM or name == "dropout" or (seeded if dropout_p is None else dropout_p != 0):
            raise Broken(node, "random numbers: the padded rows change what every later draw gets")
        self.check_scalar_args(node)
        self.check_writes(node)
        rule = RULES.get(name)
        if rule is not None:
            return rule(self, node)
        if name in POINTWISE or (name in ("max", "min") and _argument(node, "other") is not None):
            return self.pointwise(node, ins) if batched else self.out_axis(node)
        if not batched:  # no batch rows in: none out
            return self.out_axis(node)
        if name in OVER_DIMS:
            return self.over_dims(node)
        raise Broken(node, f"{name} is not known to keep rows apart")

    def pointwise(self, node: fx.Node, ins: list) -> Optional[int]:
        if not isinstance(val(node), torch.Tensor):
            raise Broken(node, "returns several tensors (a data-dependent form)")
        out = self.out_axis(node)
        rank = val(node).dim()
        for a in ins:
            ax = self.state.get(a)
            if ax is FREE:
                continue
            aligned = rank - (val(a).dim() - ax)
            if aligned != out:
                raise Broken(node, f"{a.name}'s batch axis {ax} lands on dim {aligned}, the result's is {out}")
        return out

    def over_dims(self, node: fx.Node) -> Optional[int]:
        """Reductions, scans, sorts and softmaxes over their ``dim`` argument (read from the op's schema, its
        default where not given); without one, over every dim."""
        src = node.args[0]
        ax = self.state.get(src)
        rank = max(val(src).dim(), 1)
        dims = _argument(node, "dim", default=True)
        if dims is None or dims == []:
            raise Broken(node, f"{op_name(node.target)} reduces over every dim, the batch axis too")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            raise Broken(node, f"{op_name(node.target)} over dims that are not constants")
        if any(d % rank == ax for d in dims):
            raise Broken(node, f"{op_name(node.target)} over dim {ax}, the batch axis: rows mix")
        v = val(node)
        if isinstance(v, (tuple, list)):
            return tuple(axis_of(t, self.symbol, node) if isinstance(t, torch.Tensor) else FREE for t in v)
        return axis_of(v, self.symbol, node)


def _argument(node: fx.Node, name: str, default: bool = False):
    """The value of the schema argument ``name`` (its default with ``default=True`` where not given), else None."""
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(getattr(schema, "arguments", ())):
        if arg.name == name:
            if i < len(node.args):
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            return arg.default_value if default and arg.has_default_value() else None
    return None


VIEWS = {"view", "reshape", "_unsafe_view", "slice", "select", "transpose", "permute", "unsqueeze", "squeeze",
         "expand", "alias", "as_strided", "t", "narrow", "view_as", "unflatten", "flatten", "diagonal", "unfold"}


def _base(node) -> Optional[fx.Node]:
    """The tensor ``node`` is a view of, following view ops back."""
    while isinstance(node, fx.Node) and node.op == "call_function" and op_name(node.target) in VIEWS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def batch_symbol(gm: fx.GraphModule) -> Optional[sympy.Symbol]:
    """The symbol of dim 0 of the graph's first input whose dim 0 is a plain symbol (a dynamic batch), or None."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = val(node)
        if isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt):
            expr = expr_of(v.shape[0])
            if isinstance(expr, sympy.Symbol):
                return expr
    return None


def prove_rows(graph: fx.Graph, symbol) -> RowProof:
    """Whether every output row of ``graph`` depends on the same input row alone along the dims sized by
    ``symbol`` (a sympy symbol: the padded batch size), and each input's and output's batch axis."""
    return _Prover(symbol).run(graph)
