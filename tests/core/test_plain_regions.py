"""``core/plain_regions.py``: the cut of a tensor-parallel graph into DTensor parts and plain parts. Here the
"DTensor" nodes are the linears (a predicate stands in for DTensor values, which need a process group:
``tests/distributed/test_gloo.py`` runs the real thing on 2 gloo processes)."""

import torch
import torch.nn.functional as F
from torch import fx, nn

from kp_compiler.core import plain_regions


class Block(nn.Module):
    """q, k, v and an output projection around attention that reads a mask computed from a graph input."""

    def __init__(self, d=16, heads=2, t=8, b=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads, self.shape = heads, (b, t, d)

    def forward(self, x, tril):  # tril: a graph input, as Dynamo lifts a registered buffer
        b, t, d = self.shape  # constants: fx.symbolic_trace cannot unpack a traced shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = tril == 0
        att = (q @ k.transpose(-2, -1)).masked_fill(mask, float("-inf")).softmax(-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))


def linears(node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear)


def test_parts_are_runs_in_program_order_and_the_attention_is_one():
    torch.manual_seed(0)
    model = Block()
    gm = fx.symbolic_trace(model)
    runs = {n.name: r for n, r in plain_regions.runs(gm, linears).items()}
    assert runs["q"] == (0, True) and runs["view"] == (1, False) and runs["k"] == (2, True)
    # v's reshape, the mask and the attention: the run between v and the output projection
    attention = {n: r for n, r in runs.items() if n.startswith(("view_2", "eq", "matmul", "masked_fill", "softmax"))}
    assert set(attention.values()) == {(5, False)}, attention
    assert runs["o"] == (6, True) and runs["add"] == (7, False)
    parent, plain = plain_regions.split(gm, linears)
    assert plain == ["submod_1", "submod_3", "submod_5", "submod_7"]
    assert any(n.target == "softmax" for n in parent.submod_5.graph.nodes)
    x, tril = torch.randn(2, 8, 16), torch.tril(torch.ones(8, 8))
    torch.testing.assert_close(parent(x, tril), model(x, tril), rtol=0, atol=0)  # the cut graph computes the same


class InPlace(nn.Module):
    """A buffer written in place before a linear reads nothing of it: the write must stay first."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, buf):
        buf.add_(1)
        return self.lin(x) + buf * 1


def test_an_in_place_write_keeps_its_place():
    torch.manual_seed(1)
    model = InPlace()
    parent, _ = plain_regions.split(fx.symbolic_trace(model), linears)
    x = torch.randn(2, 4)
    want, got = torch.zeros(4), torch.zeros(4)
    torch.testing.assert_close(parent(x, got), model(x, want), rtol=0, atol=0)
    assert got[0].item() == want[0].item() == 1


def test_a_no_grad_block_of_a_dynamo_graph_splits():
    """Dynamo records ``with torch.no_grad():`` as ``_set_grad_enabled`` calls, which ``split_module`` only
    takes with partition numbers that grow along the graph (as rotary embeddings in transformers have it)."""
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            with torch.no_grad():
                freq = torch.arange(8.0) / 8
            return self.lin(x * freq.cos()) + x

    graphs = []
    model = Rotary()
    torch.compile(model, backend=lambda gm, inputs: graphs.append((gm, inputs)) or gm)(torch.randn(2, 8))
    ((gm, inputs),) = graphs
    assert any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes)
    parent, plain = plain_regions.split(gm, linears)
    assert plain
    torch.testing.assert_close(parent(*inputs), gm(*inputs), rtol=0, atol=0)


def test_part_inputs_come_from_the_graphs_inputs_or_recorded_values():
    """A part reads the graph's own input where it has one (``tril``: its real value, for a pass that checks it),
    else the value recorded on the node of the same name; None where nothing is recorded."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(Block())
    x, tril = torch.randn(2, 8, 16), torch.tril(torch.ones(8, 8))
    bare = plain_regions.split(gm, linears)[0]
    assert plain_regions.part_inputs(bare, "submod_5", gm, [x, tril]) is None  # nothing recorded
    ShapeProp(gm).propagate(x, tril)
    for node in gm.graph.nodes:  # what Dynamo records on its nodes
        if "tensor_meta" in node.meta:
            node.meta["example_value"] = torch.empty(node.meta["tensor_meta"].shape)
    parent, _ = plain_regions.split(gm, linears)
    names = [ph.name for ph in parent.submod_5.graph.find_nodes(op="placeholder")]
    values = dict(zip(names, plain_regions.part_inputs(parent, "submod_5", gm, [x, tril])))
    assert values["tril"] is tril and values["v"].shape == (2, 8, 16), names
    assert plain_regions.graph_input_index(gm) == {"x": 0, "tril": 1}


def test_no_cut_without_both_kinds():
    gm = fx.symbolic_trace(Block())
    assert plain_regions.split(gm, lambda n: False) is None  # no DTensor node: the usual pipeline
    assert plain_regions.split(gm, lambda n: True) is None  # nothing plain
    assert plain_regions.split(gm) is None  # the default predicate: no DTensor anywhere
    assert not plain_regions.has_dtensor([torch.ones(2), (torch.ones(1), 3)])
