"""``core/plain_regions.py``: the cut of a tensor-parallel graph into DTensor parts and plain parts. Here the
"DTensor" nodes are the ``linear`` calls (a predicate stands in for DTensor values, which need a process group:
``tests/distributed/test_gloo.py`` runs the real thing on 2 gloo processes)."""

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from kp_compiler.core import plain_regions


class Block(nn.Module):
    """q, k, v and an output projection around attention that reads a mask computed from a buffer."""

    def __init__(self, d=16, heads=2, t=8, b=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads, self.shape = heads, (b, t, d)

    def forward(self, x, tril):  # tril: a graph input, as Dynamo lifts a registered buffer
        b, t, d = self.shape  # constants: fx.symbolic_trace cannot unpack a traced shape
        mask = tril == 0  # depends on a graph input only: moves to the attention's part
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)).masked_fill(mask, float("-inf")).softmax(-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))


def linears(node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), nn.Linear)


def test_parts_alternate_and_the_attention_is_one_plain_part():
    torch.manual_seed(0)
    model = Block()
    gm = fx.symbolic_trace(model)
    stages = plain_regions.stages(gm, linears)
    by_name = {n.name: s for n, s in stages.items()}
    assert by_name["q"] == by_name["k"] == by_name["v"] == (0, True)  # the three projections: one DTensor part
    attention = {n: s for n, s in by_name.items() if n.startswith(("matmul", "masked_fill", "softmax", "view"))}
    assert set(attention.values()) == {(1, False)}, attention  # reshapes and attention: one plain part
    assert by_name["eq"] == (1, False)  # the mask moved from stage 0 to the part that reads it
    assert plain_regions.stages(gm, lambda n: False)[gm.graph.find_nodes(op="call_function", target=operator.eq)[0]
                                                    ] == (0, False)
    assert by_name["o"] == (2, True) and by_name["add"] == (3, False)
    parent, plain = plain_regions.split(gm, linears)
    assert plain == ["submod_1", "submod_3"]
    part = getattr(parent, "submod_1")
    assert any(n.target == "softmax" for n in part.graph.nodes) and any(n.name == "eq" for n in part.graph.nodes)
    x, tril = torch.randn(2, 8, 16), torch.tril(torch.ones(8, 8))
    torch.testing.assert_close(parent(x, tril), model(x, tril), rtol=0, atol=0)  # the cut graph computes the same


def test_part_inputs_come_from_the_graphs_inputs_or_recorded_values():
    """A part reads the graph's own input where it has one (``tril``: its real value, for a pass that checks it),
    else the value recorded on the node of the same name; None where nothing is recorded."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(Block())
    x, tril = torch.randn(2, 8, 16), torch.tril(torch.ones(8, 8))
    bare = plain_regions.split(gm, linears)[0]
    assert plain_regions.part_inputs(bare, "submod_1", gm, [x, tril]) is None  # nothing recorded
    ShapeProp(gm).propagate(x, tril)
    for node in gm.graph.nodes:  # what Dynamo records on its nodes
        if "tensor_meta" in node.meta:
            node.meta["example_value"] = torch.empty(node.meta["tensor_meta"].shape)
    parent, _ = plain_regions.split(gm, linears)
    names = [ph.name for ph in parent.submod_1.graph.find_nodes(op="placeholder")]
    values = dict(zip(names, plain_regions.part_inputs(parent, "submod_1", gm, [x, tril])))
    assert values["tril"] is tril and values["q"].shape == (2, 8, 16), names
    assert plain_regions.graph_input_index(gm) == {"x": 0, "tril": 1}


def test_no_cut_without_both_kinds():
    gm = fx.symbolic_trace(Block())
    assert plain_regions.split(gm, lambda n: False) is None  # no DTensor node: the usual pipeline
    assert plain_regions.split(gm, lambda n: True) is None  # nothing plain
    assert plain_regions.split(gm) is None  # the default predicate: no DTensor anywhere
    assert not plain_regions.has_dtensor([torch.ones(2), (torch.ones(1), 3)])
    y = F.relu(torch.ones(2))
    assert not plain_regions.has_dtensor([y])
