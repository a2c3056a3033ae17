"""``ops/tp_collectives.py`` under Inductor: the ops reach the lowering as ATen and torch's functional
collectives (``decompositions()``, added to the table ``lowering/decompositions.py`` hands ``compile_fx``), so
no Python call per op runs at step time; a one-rank group moves nothing and the ops become views. The
collectives themselves run in the 2-process gloo tests (``tests/distributed``), equal to eager."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._functorch.aot_autograd import aot_function

from kp_compiler.lowering import decompositions as lowering_decompositions
from kp_compiler.ops import tp_collectives  # noqa: F401  (registers the ops)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


@pytest.fixture(scope="module")
def group_name():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def _block(group):
    def f(x, w1, w2):  # a column-parallel linear into a row-parallel one, then a gathered head
        h = F.gelu(F.linear(torch.ops.kp.tp_copy(x, group), w1))
        y = torch.ops.kp.tp_reduce(F.linear(h, w2), group)
        return torch.ops.kp.tp_all_gather(y, 1, group)
    return f


def test_the_table_holds_the_ops_for_a_graph_that_calls_them(group_name):
    gm = torch.fx.symbolic_trace(lambda x: torch.ops.kp.tp_reduce.default(x, group_name))
    table = lowering_decompositions.table([torch.randn(2)], {}, gm)
    assert table is not None and torch.ops.kp.tp_reduce.default in table
    assert lowering_decompositions.table([torch.randn(2)], {}, torch.fx.symbolic_trace(lambda x: x + 1)) is None


def test_forward_and_backward_hold_no_op_of_ours_and_equal_the_ops(group_name):
    f = _block(group_name)
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm
    table = tp_collectives.decompositions()
    compiled = aot_function(f, fw_compiler=keep, bw_compiler=keep, decompositions=table)
    inputs = [torch.randn(3, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True),
              torch.randn(8, 16, requires_grad=True)]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    out, want = compiled(*inputs), f(*twins)
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    for got, ref in zip(inputs, twins):
        torch.testing.assert_close(got.grad, ref.grad)
    assert len(graphs) == 2
    for gm in graphs:
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert not any(t.startswith("kp.") for t in targets), targets


def test_no_autograd_cache_for_graphs_with_the_collectives(group_name):
    """The decomposition reads the group's size (views for one rank), which AOTAutograd's cache key does not
    cover: a world-size-1 compile must not be served to a 2-rank run of a graph whose inputs have the same
    shapes, so such graphs compile without that cache."""
    import torch._functorch.config as functorch_config

    gm = torch.fx.symbolic_trace(lambda y: torch.ops.kp.tp_reduce.default(y, group_name))
    plain = torch.fx.symbolic_trace(lambda y: y + 1)
    before = functorch_config.enable_autograd_cache
    with lowering_decompositions.cache_guard(gm):
        assert functorch_config.enable_autograd_cache is False
    with lowering_decompositions.cache_guard(plain):
        assert functorch_config.enable_autograd_cache is before
