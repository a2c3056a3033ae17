"""The shared matching layer: links, optional links, user counts, commuted args, list args; the one eraser."""

import ast
import pathlib

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kp_compiler.core.graph import alive, erase_dead
from kp_compiler.core.pattern import P, is_call, number

aten = torch.ops.aten
PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "kp_compiler"


def trace(fn, *shapes):
    return make_fx(fn, pre_dispatch=True)(*[torch.randn(s) for s in shapes])


def nodes_of(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


SCALE = P((aten.mul.Tensor, aten.div.Tensor), P.var("x"), P.var("c", where=number))
CAST = P(aten.to.dtype, P.var("x"))
MM = P(aten.matmul.default, P.var("a"), P.var("b"), name="mm")


def test_skip_peels_any_number_of_links_and_captures_them_outermost_first():
    gm = trace(lambda a, b: ((a @ b) / 8.0 * 2.0).to(torch.float64), (4, 4), (4, 4))
    root = nodes_of(gm, aten.to.dtype)[0]
    caps = P.skip(CAST | SCALE, MM, name="links").find(root)
    assert caps is not None and caps["mm"].target is aten.matmul.default
    assert [n.target for n, _ in caps["links"]] == [aten.to.dtype, aten.mul.Tensor, aten.div.Tensor]
    assert [c.get("c") for _, c in caps["links"]] == [None, 2.0, 8.0]
    assert P.skip(SCALE, MM).find(root) is None, "a cast is not a scaling: the chain stops there"
    assert P.skip(CAST | SCALE, MM, max=2).find(root) is None, "three links, at most two allowed"
    mm = nodes_of(gm, aten.matmul.default)[0]
    assert P.skip(SCALE, MM, max=1, name="links").find(mm)["links"] == [], "zero links also match"


def test_users_and_where_constrain_the_node():
    gm = trace(lambda x: x.exp() + x.exp().sin(), (4,))
    exps = nodes_of(gm, aten.exp.default)
    one_user = P(aten.exp.default, P.var("x"), users=1)
    assert all(one_user.find(e) is not None for e in exps)
    x = exps[0].args[0]
    assert P.var(users=2).find(x) is not None and P.var(users=1).find(x) is None
    assert P.var(users=lambda n: len(n.users) > 1).find(x) is not None
    assert P(aten.exp.default, where=lambda n: n is exps[1]).find(exps[0]) is None


def test_commute_tries_both_orders_and_keeps_captures_consistent():
    gm = trace(lambda x, y: x.exp() * y, (4,), (4,))
    mul = nodes_of(gm, aten.mul.Tensor)[0]
    exp_first = P(aten.mul.Tensor, P(aten.exp.default, P.var("x")), P.var("y"))
    assert exp_first.find(mul) is not None
    other = P(aten.mul.Tensor, P.var("y", where=lambda n: n.op == "placeholder"), P(aten.exp.default, P.var("x")))
    assert other.find(mul) is None
    caps = P(aten.mul.Tensor, P.var("y", where=lambda n: n.op == "placeholder"), P(aten.exp.default, P.var("x")),
             commute=True).find(mul)
    assert caps is not None and caps["y"].name == "y_1" and caps["x"].name == "x_1"


def test_list_arguments_match_element_by_element():
    gm = trace(lambda x, i: x[i.long()], (6, 3), (2,))
    index = nodes_of(gm, aten.index.Tensor)[0]
    assert P(aten.index.Tensor, P.var("x"), [P(aten.to.dtype, P.var("i"))]).find(index) is not None
    assert P(aten.index.Tensor, P.var("x"), [P.var(), P.var()]).find(index) is None, "length must agree"
    assert is_call(index, aten.index.Tensor) and not is_call(index, aten.mm.default) and not is_call(3, aten.mm)


def test_erase_dead_takes_a_chain_users_first_then_pure_inputs_only():
    def fn(x, buf, unused):
        y = torch.nn.functional.dropout(x.sin(), 0.5, True).cos()
        buf.add_(1)
        return x + 1, buf

    gm = trace(fn, (4,), (4,), (4,))
    cos, dropout = nodes_of(gm, aten.cos.default)[0], nodes_of(gm, aten.dropout.default)[0]
    sin = nodes_of(gm, aten.sin.default)[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    add_ = nodes_of(gm, aten.add_.Tensor)[0]
    gone = erase_dead([dropout, cos, *placeholders])
    assert gone == {cos, dropout, sin}, "it returns exactly what it erased"
    assert not alive(cos) and not alive(dropout), "listed nodes go even if impure, users first"
    assert not alive(sin), "a pure input nothing else reads follows"
    assert all(alive(p) for p in placeholders), "placeholders (even unused ones) are the calling convention"
    assert not placeholders[2].users
    assert alive(add_)
    gm.graph.lint()


def test_passes_erase_through_the_one_eraser_and_share_the_helpers():
    """No pass module erases nodes itself or redefines the shared helpers (``_number``, ``_is``, erasers)."""
    offenders = []
    for path in sorted((PACKAGE / "passes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("erase_node", "_erased"):
                offenders.append(f"{path.name}: .{node.attr}")
            if isinstance(node, ast.FunctionDef) and node.name in (
                    "_number", "_is", "_erased", "erase_unused", "_erase_matched", "_single_user"):
                offenders.append(f"{path.name}: def {node.name}")
    assert not offenders, offenders
