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

    def run(self, graph: fx.Graph) -> RowProof:
        inputs, outputs, sizes = [], [], []
        try:
            for node in graph.nodes:
                if node.op == "placeholder":
                    v = val(node)
                    if isinstance(v, torch.Tensor):
                        self.state[node] = axis_of(v, self.symbol, node)
                    elif isinstance(v, torch.SymInt) and holds(v, self.symbol):
                        if expr_of(v) != self.symbol:
                            raise Broken(node, f"an input size {v} computed from the batch size")
                        self.tainted.add(node)
                        sizes.append(len(inputs))
                    inputs.append(self.state.get(node))
                elif node.op == "output":
                    outputs = [self.axis(node, a) for a in _tensors(node.args[0])]
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
        return RowProof(True, inputs=inputs, outputs=outputs, sizes=sizes)

    def step(self, node: fx.Node):
        t = node.target
        if t in SHAPE_ONLY:
            if t in (aten.sym_size.int, aten.sym_numel.default) and holds(val(node), self.symbol):
                self.tainted.add(node)
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
        if name in RANDOM or (name == "dropout" and (len(node.args) < 3 or node.args[2])):
            raise Broken(node, "random numbers: the padded rows change what every later draw gets")
        if name == "dropout":
            return self.state.get(node.args[0])
        rule = RULES.get(name)
        if rule is not None:
            return rule(self, node)
        if name in POINTWISE:
            self.check_scalars(node, node.args)
            return self.pointwise(node, ins) if batched else self.out_axis(node)
        if not batched:  # no batch rows in: none out, unless the batch size is used as a value
            self.check_scalars(node, node.args)
            return self.out_axis(node)
        if name in OVER_DIMS:
            return self.over_dims(node)
        raise Broken(node, f"{name} is not known to keep rows apart")

    def pointwise(self, node: fx.Node, ins: list) -> Optional[int]:
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
        src = node.args[0]
        ax = self.state.get(src)
        rank = max(val(src).dim(), 1)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if op_name(node.target) == "topk":
            dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        if op_name(node.target) in ("sort", "argsort") and dims is None:
            dims = -1
        if dims is None or dims == []:
            raise Broken(node, "reduces over every dim, the batch axis too")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(d % rank == ax for d in dims):
            raise Broken(node, f"{op_name(node.target)} over dim {ax}, the batch axis: rows mix")
        v = val(node)
        first = v[0] if isinstance(v, (tuple, list)) else v
        out = axis_of(first, self.symbol, node)
        return tuple(out for _ in v) if isinstance(v, (tuple, list)) else out


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
