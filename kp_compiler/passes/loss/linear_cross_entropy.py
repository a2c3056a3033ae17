"""``linear-cross-entropy``: the LM head and the cross-entropy of its logits onto one chunked op (issue 20).

Matches, in the canonical graph of a training step, walking up from the loss::

    cross_entropy_loss(view?(to_fp32?(softcap?(linear(h, W, b?)))), labels, weight=None, mean | sum,
                       ignore_index, label_smoothing)

with the views, ``contiguous`` and the fp32 cast in any order (``logits.float().view(-1, V)``, as transformers'
loss writes it, or the other way), slices along a token dimension (the older shift,
``logits[..., :-1, :].contiguous()``: the same slice is taken of ``h``), ``softcap(z) = c * tanh(z / c)`` as
Gemma writes it, and any label tensor (shifted labels never touch the logits). Emits ``kp::linear_cross_entropy``
(``ops/linear_cross_entropy.py``), which never makes the whole logits tensor.

Preconditions, else the graph is left alone and the report's note names the failed one:

- the graph is compiled for training (a backward may run): elsewhere the logits cost no gradient;
- every value between the linear and the loss has the loss as its only reader: logits that are also an
  output of the graph (transformers returns them beside the loss) would have to be made anyway;
- ``W`` (and ``b``) are parameters of the graph (placeholders holding ``nn.Parameter``s);
- the loss is computed in fp32 (the logits cast to it, or made in it): a loss in 16-bit floats is not what
  the op computes; no class weights; reduction ``mean`` or ``sum``.

A default pass, gated by ``options["linear_cross_entropy"]``: ``"auto"`` rewrites heads of at least 128000
classes on CUDA GPUs of compute capability 9.0 and up, where it is measured (H200, vocabulary 128256: half of
Inductor's step memory at a step time no slower, ``docs/passes/linear-cross-entropy.md``); ``True`` any head
on any device; ``False`` never. It computes the gradients in the forward, so a loss computed with gradients
enabled and never backpropagated (an eval loss outside ``torch.no_grad()``) pays for three GEMMs instead of
one. A frozen head (LoRA) gets ``weight_grads=False``: no weight-gradient GEMM, and a ``FrozenHead`` check
before every call in case it is unfrozen without a recompile.

Before::

    %linear_1 = aten.linear.default(%h, %w) : f32[2, 5, 50]
    %to = aten.to.dtype(%linear_1, torch.float32) : f32[2, 5, 50]
    %view = aten.view.default(%to, [-1, 50]) : f32[10, 50]
    %cross_entropy_loss = aten.cross_entropy_loss.default(%view, %labels) : f32[]

After::

    %reshape = aten.reshape.default(%h, [-1, 16]) : f32[10, 16]
    %linear_cross_entropy = kp.linear_cross_entropy.default(%reshape, %w, None, %labels, -100, 0.0, 'mean', 0.0, 4096,
                                                            True)
    %getitem = _operator.getitem(%linear_cross_entropy, 0) : f32[]
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from ...core import context
from ...core.graph import erase_dead, val
from ...core.pattern import is_call
from ...core.rules import Matches
from ...ops import linear_cross_entropy as lce

aten = torch.ops.aten

MEASURED_FROM = (9, 0)  # compute capability of the GPU it is measured on (H200); "auto" turns it on from here
AUTO_MIN_VOCAB = 128000  # the vocabulary it is measured at (128256); "auto" leaves smaller heads to Inductor
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
         aten.clone.default)
REDUCTIONS = {1: "mean", 2: "sum"}  # torch's Reduction enum: 0 none, 1 mean, 2 sum
# one explain line (160 characters) with the node's name in front
OUTPUT_NOTE = ("logits also returned (as transformers does); compile a step returning only the loss: "
               "lambda i, y: model(input_ids=i, labels=y).loss")


def applies(target, options) -> Optional[str]:
    """Training graphs without ``torch.autocast`` where ``options["linear_cross_entropy"]`` allows: ``"auto"``
    (CUDA, compute capability 9.0 and up, where it is measured), ``True`` (any device), ``False`` (never)."""
    mode = getattr(options, "linear_cross_entropy", "auto")
    if mode is False:
        return "off (options['linear_cross_entropy']=False)"
    if not target.training:
        return "no backward runs in this graph: its logits cost no gradient"
    if target.autocast:  # mixed-precision training: the head's GEMMs would run in fp32 inside the op
        return ("torch.autocast is on: kp::linear_cross_entropy has no autocast rule, so it would run the head's "
                "GEMMs on the fp32 hidden states and weight where eager runs them in the autocast dtype")
    device = target.device
    if mode == "auto" and not (device.kind == "cuda" and (device.capability or (0, 0)) >= MEASURED_FROM):
        return (f"on by default on CUDA GPUs of compute capability {MEASURED_FROM[0]}.{MEASURED_FROM[1]} and up, "
                f"where it is measured; options['linear_cross_entropy']=True runs it on {device.kind}")
    return None


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _only_reader(node: fx.Node, reader: fx.Node) -> Optional[str]:
    """None if ``reader`` is ``node``'s one user, else why not."""
    others = [u for u in node.users if u is not reader]
    if not others:
        return None
    if any(u.op == "output" for u in others):
        return OUTPUT_NOTE
    return f"{node.name} is also read by {others[0].name}"


def _softcap(node: fx.Node) -> Optional[tuple]:
    """``(z, c)`` for ``mul(tanh(div(z, c)), c)`` with each link read once, else None."""
    if not (is_call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float))):
        return None
    tanh = node.args[0]
    if not (is_call(tanh, aten.tanh.default) and len(tanh.users) == 1):
        return None
    div = tanh.args[0]
    if not (is_call(div, aten.div.Tensor) and len(div.users) == 1 and div.args[1] == node.args[1]):
        return None
    return div.args[0], float(node.args[1])


def match(loss: fx.Node) -> tuple:
    """``(fields, None)`` for a loss the op can compute, ``(None, why not)`` for a near miss."""
    if _arg(loss, 2, "weight", None) is not None:
        return None, "class weights are not supported"
    reduction = REDUCTIONS.get(_arg(loss, 3, "reduction", 1))
    if reduction is None:
        return None, "reduction 'none' (per-token losses) is not supported"
    x, labels = loss.args[0], loss.args[1]
    if val(labels) is None or val(labels).dtype != torch.int64 or val(labels).dim() != 1:
        return None, "the targets are not class indices (int64, one per token): probabilities are not supported"
    if val(x) is None or val(x).dtype != torch.float32:
        return None, "the loss is not computed in fp32"
    node, reader, softcap, slices = x, loss, 0.0, []
    while True:
        why = _only_reader(node, reader)
        if why is not None:
            return None, why
        if is_call(node, *VIEWS) or (is_call(node, aten.to.dtype) and node.args[1] == torch.float32):
            if slices and val(node).shape != val(node.args[0]).shape:
                return None, "the logits are reshaped before a slice of their tokens"  # h's dims would not match
            node, reader = node.args[0], node
            continue
        if is_call(node, aten.slice.Tensor):  # the older shift, logits[..., :-1, :]: a token dim, never the vocab's
            dim = node.args[1] if len(node.args) > 1 else 0
            rank = val(node).dim()
            if (dim % rank) == rank - 1:
                return None, "the logits are sliced along the vocabulary"
            slices.append((dim % rank, *node.args[2:]))
            node, reader = node.args[0], node
            continue
        capped = _softcap(node) if not softcap else None
        if capped is not None:
            reader = node.args[0].args[0]  # the div: the linear's reader
            node, softcap = capped
            continue
        break
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return None, (f"the logits are a graph input ({node.name}): the head was computed in another graph (a "
                      "graph break between the head and the loss, or Dynamo's DDP optimizer splitting the model at "
                      "a gradient bucket; torch._dynamo.config.optimize_ddp = False keeps one graph)")
    if not is_call(node, aten.linear.default):
        return None, f"the logits come from {node.name}, not a linear"
    h, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias", None)
    ctx = context.current()
    weight_grads = False
    for p in (w, b):
        if p is None:
            continue
        if not (isinstance(p, fx.Node) and p.op == "placeholder"
                and (ctx is None or isinstance(ctx.example_value(p), torch.nn.Parameter))):
            return None, f"{getattr(p, 'name', p)}: the head's weight or bias is not a parameter of the graph"
        # a frozen head (LoRA): no weight gradient to make (unfreezing: Dynamo recompiles where it guards
        # requires_grad, else the FrozenHead hook raises)
        weight_grads = weight_grads or ctx is None or ctx.example_value(p).requires_grad
    if val(x).shape[-1] != val(w).shape[0] or val(x).dim() != 2:
        return None, "the logits are not flattened to [tokens, vocabulary]"
    fields = dict(linear=node, h=h, w=w, b=b, labels=loss.args[1], reduction=reduction, softcap=softcap,
                  weight_grads=weight_grads,
                  slices=slices[::-1],  # as the model applies them, from the linear down
                  ignore_index=int(_arg(loss, 4, "ignore_index", -100)),
                  smoothing=float(_arg(loss, 5, "label_smoothing", 0.0)))
    return fields, None


def linear_cross_entropy(gm: fx.GraphModule) -> Matches:
    """Rewrite every LM head + cross-entropy of ``gm`` that ``match`` accepts; notes name the failed link."""
    count, notes = 0, []
    for loss in list(gm.graph.nodes):
        if not is_call(loss, aten.cross_entropy_loss.default):
            continue
        fields, why = match(loss)
        if fields is None:
            notes.append(f"{loss.name} kept: {why}")
            continue
        vocab = val(fields["w"]).shape[0]  # a weight's static size: no guard
        if _mode() == "auto" and vocab < AUTO_MIN_VOCAB:
            notes.append(f"{loss.name} kept: vocabulary {vocab} is below the {AUTO_MIN_VOCAB} it is measured from "
                         "(options['linear_cross_entropy']=True rewrites it)")
            continue
        _emit(gm, loss, fields)
        ctx = context.current()
        if not fields["weight_grads"] and ctx is not None:
            heads = [p for p in (fields["w"], fields["b"]) if p is not None]
            ctx.hooks.append(FrozenHead(tuple(ctx.graph_inputs.index(p) for p in heads),
                                        tuple(p.name for p in heads)))
        count += 1
    if count:
        gm.recompile()
    return Matches({"linear-cross-entropy": count} if count else {}, notes)


class FrozenHead:
    """Run before every call of a graph emitted with ``weight_grads=False``: raises if a head parameter that was
    frozen at compile time requires a gradient now. Newer Dynamo guards ``requires_grad`` and recompiles first,
    so this never fires there; torch 2.9's does not, and its compiled graph (Inductor's alone too) would drop
    that gradient without a word."""

    def __init__(self, inputs: tuple, names: tuple):
        self.inputs, self.names = inputs, names

    def __call__(self, args) -> None:
        for i, name in zip(self.inputs, self.names):
            if args[i].requires_grad:
                raise RuntimeError(
                    f"kp_compiler: the LM head's {name} was frozen (requires_grad=False) when this graph was "
                    "compiled and requires a gradient now; this torch does not recompile for that, so the gradient "
                    "would be lost. Call torch._dynamo.reset() after unfreezing, or compile after unfreezing.")


def _mode():
    ctx = context.current()
    return getattr(getattr(ctx, "options", None), "linear_cross_entropy", "auto")


def _emit(gm: fx.GraphModule, loss: fx.Node, f: dict) -> None:
    g = gm.graph
    d = val(f["w"]).shape[1]
    vocab = val(f["w"]).shape[0]
    with g.inserting_before(loss):
        h = f["h"]
        for args in f["slices"]:  # a token-dim slice commutes with the linear: slice its input instead
            h = g.call_function(aten.slice.Tensor, (h, *args))
        h = g.call_function(aten.reshape.default, (h, [-1, d]))
        out = g.call_function(torch.ops.kp.linear_cross_entropy.default,
                              (h, f["w"], f["b"], f["labels"], f["ignore_index"], f["smoothing"], f["reduction"],
                               f["softcap"], lce.chunk_rows(vocab), f["weight_grads"]))
        new = g.call_function(operator.getitem, (out, 0))
    new.meta["val"] = val(loss)
    loss.replace_all_uses_with(new)
    erase_dead([loss])
