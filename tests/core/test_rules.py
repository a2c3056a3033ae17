"""The rule engine: matching, captures, alternatives, fixed point, attribution."""

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from kp_compiler.core.rules import Matches, P, Rule, RuleSet

aten = torch.ops.aten


def trace(fn, *shapes):
    return make_fx(fn, pre_dispatch=True)(*[torch.randn(s) for s in shapes])


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def node_of(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def test_pattern_matches_op_args_and_literals():
    gm = trace(lambda x: (x * 2).relu(), (4,))
    mul = node_of(gm, aten.mul.Tensor)
    caps = {}
    assert P(aten.mul.Tensor, P.var("x"), P.lit(2)).match(mul, caps)
    assert caps["x"].op == "placeholder"
    assert not P(aten.mul.Tensor, P.var("x"), P.lit(3)).match(mul, {})
    assert not P(aten.add.Tensor, P.var("x"), P.lit(2)).match(mul, {})
    assert P(aten.mul, P.var(), 2).match(mul, {}), "a packet matches any overload; plain values compare"
    assert not P(aten.mul, P.var(), 2.5).match(mul, {})
    relu = node_of(gm, aten.relu.default)
    caps = {}
    assert P(aten.relu.default, P(aten.mul.Tensor, P.var("x"), P.lit(2), name="m")).match(relu, caps)
    assert caps["m"] is mul


def test_literal_does_not_match_bool_or_node():
    gm = trace(lambda x, y: x * y, (4,), (4,))
    mul = node_of(gm, aten.mul.Tensor)
    assert not P(aten.mul.Tensor, P.var(), P.lit(1)).match(mul, {})
    assert not P.lit(1).match(True, {})
    assert P.lit(1).match(1.0, {})


def test_repeated_capture_must_be_the_same_node():
    gm = trace(lambda x, y: (x - x) + (x - y), (4,), (4,))
    subs = [n for n in gm.graph.nodes if n.target is aten.sub.Tensor]
    same = P(aten.sub.Tensor, P.var("a"), P.var("a"))
    assert same.match(subs[0], {})
    assert not same.match(subs[1], {})


def test_alternatives_and_where():
    gm = trace(lambda x: x.exp() + x.sin(), (4,))
    pat = P(aten.exp.default, P.var("x")) | P(aten.sin.default, P.var("x"))
    assert sum(pat.match(n, {}) for n in gm.graph.nodes) == 2
    big = P.var("x", where=lambda v: isinstance(v, (int, float)) and v > 5)
    assert big.match(7, {}) and not big.match(3, {})


def test_failed_match_leaves_captures_untouched():
    gm = trace(lambda x: x * 2, (4,))
    caps = {"keep": 1}
    assert not P(aten.mul.Tensor, P.var("x"), P.lit(3)).match(node_of(gm, aten.mul.Tensor), caps)
    assert caps == {"keep": 1}


def test_ruleset_runs_to_fixed_point_and_counts_per_rule():
    gm = trace(lambda x: ((x.neg().neg()).neg().neg()).relu(), (4,))
    x = P.var("x")
    rule = Rule(P(aten.neg.default, P(aten.neg.default, x)), lambda m, x: x, name="double-neg")
    result = RuleSet("cancel", [rule])(gm)
    assert isinstance(result, Matches) and result == 2
    assert result.by_rule == {rule.key: 2}
    assert rule.source.startswith("test_rules.py:")
    assert targets(gm) == [aten.relu.default]
    x_in = torch.randn(4)
    torch.testing.assert_close(gm(x_in), x_in.relu())


def test_replacement_can_build_new_nodes_with_fake_values():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        gm = make_fx(lambda x: x * 2.0, pre_dispatch=True)(mode.from_tensor(torch.randn(4, 3)))
    rule = Rule(P(aten.mul.Tensor, P.var("x"), P.lit(2.0)), lambda m, x: m.call(aten.add.Tensor, x, x), name="x2")
    assert RuleSet("double", [rule])(gm) == 1
    add = node_of(gm, aten.add.Tensor)
    assert add.meta["val"].shape == (4, 3)
    x_in = torch.randn(4, 3)
    torch.testing.assert_close(gm(x_in), x_in * 2)


def test_declining_rule_changes_nothing():
    gm = trace(lambda x: (x * 1).relu(), (4,))
    before = targets(gm)
    assert RuleSet("no", [Rule(P(aten.mul.Tensor, P.var("x"), P.lit(1)), lambda m, x: None)])(gm) == 0
    assert targets(gm) == before


def test_rules_that_undo_each_other_are_reported():
    gm = trace(lambda x: x.exp().relu(), (4,))
    flip = [
        Rule(P(aten.exp.default, P.var("x")), lambda m, x: m.call(aten.sin.default, x), name="exp-to-sin"),
        Rule(P(aten.sin.default, P.var("x")), lambda m, x: m.call(aten.exp.default, x), name="sin-to-exp"),
    ]
    with pytest.raises(RuntimeError, match="did not reach a fixed point"):
        RuleSet("ping-pong", flip, max_rounds=4)(gm)


def test_rulesets_compose_with_plus():
    a = RuleSet("a", [Rule(P(aten.neg.default, P(aten.neg.default, P.var("x"))), lambda m, x: x)])
    b = RuleSet("b", [Rule(P(aten.mul.Tensor, P.var("x"), P.lit(1)), lambda m, x: x)])
    both = a + b
    assert both.name == "a+b" and len(both.rules) == 2
    gm = trace(lambda x: (x.neg().neg() * 1).relu(), (4,))
    assert both(gm) == 2
    assert targets(gm) == [aten.relu.default]


def test_dead_inputs_of_a_replaced_node_are_erased_but_mutations_kept():
    def fn(x, buf):
        y = x.exp()
        buf.add_(1)
        return (y * 0 + x).relu()

    gm = trace(fn, (4,), (4,))
    rule = Rule(P(aten.add.Tensor, P(aten.mul.Tensor, P.var(), P.lit(0)), P.var("x")), lambda m, x: x)
    assert RuleSet("drop-zero-term", [rule])(gm) == 1
    assert aten.exp.default not in targets(gm)
    assert aten.add_.Tensor in targets(gm)
    assert isinstance(gm, fx.GraphModule)
