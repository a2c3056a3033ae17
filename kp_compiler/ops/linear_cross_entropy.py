"""``kp::linear_cross_entropy``: a linear (the LM head) and the cross-entropy of its logits, chunk by chunk.

::

    loss, grad_h, grad_w, grad_b = linear_cross_entropy(h, w, b, labels, ignore_index, label_smoothing,
                                                        reduction, softcap, chunk, weight_grads=True)
    loss == F.cross_entropy(softcap(h @ w.T + b).float(), labels, ignore_index=..., label_smoothing=...,
                            reduction=...)                 # softcap(z) = c * tanh(z / c), none where c == 0

``h [N, d]``, ``w [V, d]`` (the model's parameter), ``b [V]`` or None, ``labels [N]`` (int64),
``reduction`` ``"mean"`` or ``"sum"``. The logits are never whole: ``rows_per_chunk(N, chunk)`` rows of tokens
at a time (``chunk``, from the vocabulary, raised so that there are at most ``MAX_CHUNKS`` chunks), the
chunk's logits are made (``h`` dtype, as eager's linear makes them), taken to fp32, their log-sum-exp and
loss computed, and turned in place into the gradient of the loss with respect to them, which then gives this
chunk's rows of ``grad_h`` and its part of ``grad_w`` and ``grad_b``, in chunk order (deterministic).
``grad_w`` is accumulated in ``w``'s dtype by default: one GEMM per chunk adding into it, each sum taken in the
GEMM's fp32 accumulator and rounded once per chunk (at most ``MAX_CHUNKS`` roundings where eager has one; no
``[V, d]`` fp32 buffer, which at a 128k vocabulary would be most of the memory saved). ``KP_LCE_ACCUMULATE=fp32``
accumulates in fp32 instead (``accumulation``, ``_accumulate``). ``grad_b`` is summed in fp32. With
``weight_grads=False`` (a frozen head, as in LoRA fine-tuning) ``grad_w`` and ``grad_b`` are not computed (one
GEMM per chunk fewer) and come back empty; the backward then refuses to give them. The gradients are made in
the forward, for a gradient of the loss of 1, and returned; the autograd formula scales them by
the incoming gradient. So a training step runs the three GEMMs an unfused
one runs, and holds one chunk of logits instead of all of them (and their fp32 copy, and their gradient).

The rows' part (log-sum-exp, loss, gradient of the logits) is ``rows``, in ATen here; CUDA registers a fused
kernel for it in ``lowering``. Numerics follow eager: ``mean`` divides by the number of labels that are not
``ignore_index``, so a batch with none gives a NaN loss and zero gradients, as eager does. The softcap is
computed in fp32 (eager computes it in the logits' dtype before the cast).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum")


def _check(h, w, b, labels, reduction: str, softcap: float, chunk: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"kp::linear_cross_entropy: reduction {reduction!r} is not one of {REDUCTIONS}")
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"kp::linear_cross_entropy: h must be [N, d] and w [V, d]; got {tuple(h.shape)}, "
                         f"{tuple(w.shape)}")
    if labels.shape != (h.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"kp::linear_cross_entropy: labels must be int64 [N] = [{h.shape[0]}]; got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"kp::linear_cross_entropy: the bias must be [V] = [{w.shape[0]}]; got {tuple(b.shape)}")
    if softcap < 0 or chunk < 1:
        raise ValueError(f"kp::linear_cross_entropy: softcap must be >= 0 (0: none) and chunk >= 1; got "
                         f"{softcap}, {chunk}")


def rows(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float, softcap: float,
         scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> tuple:
    """For a chunk's logits ``z [n, V]``: (each row's loss in fp32, 0 for an ignored label, written into
    ``out [n]`` when given; the gradient of ``scale *`` the rows' summed loss with respect to ``z``, in ``z``'s
    dtype). ``scale``: a 0-d tensor in the dtype the rows are computed in (fp32, or fp64 for fp64 logits)."""
    zf = z.to(scale.dtype)
    if softcap:
        t = torch.tanh(zf / softcap)
        zf = t * softcap
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(zf, dim=1)
    nll = lse - zf.gather(1, safe[:, None]).squeeze(1)
    loss = (1.0 - smoothing) * nll + smoothing * (lse - zf.mean(dim=1)) if smoothing else nll
    loss = torch.where(valid, loss, 0.0)
    if out is not None:
        loss = out.copy_(loss)
    grad = torch.exp(zf - lse[:, None])  # softmax
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], smoothing - 1.0))
    if smoothing:
        grad -= smoothing / z.shape[1]
    grad *= torch.where(valid, scale, 0.0)[:, None]
    if softcap:
        grad *= 1.0 - t * t
    return loss, grad.to(z.dtype)


MAX_CHUNKS = 8  # at most this many chunks, so at most this many roundings of a 16-bit grad_w (rows_per_chunk)
ACCUMULATIONS = ("weight", "fp32")


def accumulation() -> str:
    """``KP_LCE_ACCUMULATE``: ``"weight"`` (default: ``grad_w`` accumulated in ``w``'s dtype, no ``[V, d]`` fp32
    buffer) or ``"fp32"`` (an fp32 accumulator, cast once at the end: exact sums, ``4 V d`` bytes more)."""
    mode = os.environ.get("KP_LCE_ACCUMULATE", "weight")
    if mode not in ACCUMULATIONS:
        raise ValueError(f"KP_LCE_ACCUMULATE={mode!r} is not one of {ACCUMULATIONS}")
    return mode


def rows_per_chunk(n: int, chunk: int) -> int:
    """Token rows per chunk for ``n`` tokens: ``chunk`` (the vocabulary's table, ``chunk_rows``), or the least
    multiple of it that makes at most ``MAX_CHUNKS`` chunks. ``n`` is a concrete size here (the op's kernel runs
    on real tensors), so the choice adds no guard."""
    need = -(-n // MAX_CHUNKS)
    return chunk * max(1, -(-need // chunk))


def forward(h, w, b, labels, ignore_index: int, smoothing: float, reduction: str, softcap: float, chunk: int,
            rows_fn=rows, weight_grads: bool = True) -> tuple:
    """The chunked loop (any device); ``rows_fn``: ``rows`` or a fused kernel with its signature.

    Few kernels outside the loop, since a small model's step is host-bound here (the H200 profile at fa14e10
    showed the GPU idle while this function queued work): the rows write their losses into one buffer summed
    once at the end, and the mean's scale is ``1 / max(count, 1)`` (with no valid label every row's gradient
    is masked to 0 anyway, and the loss is ``0 / 0``, NaN, as eager's)."""
    n = h.shape[0]
    step = rows_per_chunk(n, chunk)
    # The first chunk's GEMM is queued before the bookkeeping below, which then overlaps it on a GPU (the
    # host time before it is otherwise GPU idle time in a host-bound step).
    z = torch.nn.functional.linear(h[:step], w, b) if n else None
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    mean = reduction == "mean"
    count = (labels != ignore_index).sum() if mean else None
    if mean:  # the reciprocal of the int count is taken in fp32; fp64 logits get it in fp64
        safe = count.clamp_min(1)
        scale = (safe.to(acc) if acc == torch.float64 else safe).reciprocal().to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=h.device)
    losses = torch.empty(n, dtype=acc, device=h.device)
    grad_h = torch.empty_like(h)
    w_acc = w.dtype if accumulation() == "weight" or w.dtype == torch.float64 else acc
    grad_w = torch.zeros(w.shape, dtype=w_acc, device=w.device) if n == 0 and weight_grads else None
    grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if b is not None and weight_grads else None
    for start in range(0, n, step):
        hc = h[start:start + step]
        if start:
            z = torch.nn.functional.linear(hc, w, b)
        _, g = rows_fn(z, labels[start:start + step], ignore_index, smoothing, softcap, scale,
                       out=losses[start:start + step])
        torch.mm(g, w, out=grad_h[start:start + step])
        if weight_grads:
            grad_w = _accumulate(grad_w, g.t(), hc, w_acc)
        if grad_b is not None:
            grad_b += g.sum(0, dtype=acc)
        del z, g  # so the next chunk's logits are not allocated while this chunk's are still held
    loss = losses.sum() / count if mean else losses.sum()
    if not weight_grads:
        return loss, grad_h, w.new_empty(0), h.new_empty(0)
    return (loss, grad_h, grad_w.to(w.dtype),
            grad_b.to(b.dtype) if grad_b is not None else h.new_empty(0))


_FP32_OUT: dict = {}  # device -> whether addmm with a 16-bit product into fp32 works there (probed once)


def _accumulate(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc + a @ b`` in ``dtype`` (``acc`` None: the first chunk's product alone), in place after the first.
    In the operands' dtype: one GEMM, the sum taken in the GEMM's fp32 accumulator and rounded once per call.
    Into fp32 from 16-bit operands on CUDA: one GEMM into the fp32 ``acc`` (``addmm``'s ``out_dtype``: no
    ``[V, d]`` product in 16 bits, no fp32 copy of it, no separate add); elsewhere the product then the add."""
    if acc is None and a.dtype == dtype:
        return a @ b
    if acc is None:
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    if a.dtype == dtype:
        return acc.addmm_(a, b)
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32 and _fp32_out(a.device):
        return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    return acc.add_((a @ b).to(dtype))


def _fp32_out(device: torch.device) -> bool:
    """Whether ``addmm.dtype_out`` accumulates 16-bit products into fp32 correctly on ``device``: tried once on
    small operands against the fp32 product (an older build without it keeps the two-step path)."""
    if device not in _FP32_OUT:
        try:
            a = torch.arange(6, device=device, dtype=torch.float32).view(2, 3).to(torch.bfloat16)
            acc = torch.ones(2, 2, device=device)
            torch.ops.aten.addmm.dtype_out(acc, a, a.t(), torch.float32, out=acc)
            _FP32_OUT[device] = torch.equal(acc, 1 + a.float() @ a.float().t())
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT[device] = False
    return _FP32_OUT[device]


@torch.library.custom_op("kp::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], labels: torch.Tensor,
                         ignore_index: int, label_smoothing: float, reduction: str, softcap: float,
                         chunk: int, weight_grads: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(h, w, b, labels, reduction, softcap, chunk)
    with torch.no_grad():
        return forward(h, w, b, labels, ignore_index, label_smoothing, reduction, softcap, chunk,
                       weight_grads=weight_grads)


@linear_cross_entropy.register_fake
def _(h, w, b, labels, ignore_index, label_smoothing, reduction, softcap, chunk, weight_grads=True):
    grad_b = torch.empty_like(b) if b is not None and weight_grads else h.new_empty(0)
    grad_w = torch.empty_like(w) if weight_grads else w.new_empty(0)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return h.new_empty((), dtype=acc), torch.empty_like(h), grad_w, grad_b


def _setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.weight_grads = inputs[9] if len(inputs) > 9 else True
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *unused):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    if (need[1] or (ctx.has_bias and need[2])) and not ctx.weight_grads:
        raise RuntimeError("kp::linear_cross_entropy: the head's weight (or bias) needs a gradient, but the op was "
                           "called with weight_grads=False (the head was frozen when the graph was compiled)")
    return (grad_h * grad_loss if need[0] else None, grad_w * grad_loss if need[1] else None,
            grad_b * grad_loss if ctx.has_bias and need[2] else None, None, None, None, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


def chunk_rows(vocab: int) -> int:
    """Token rows per chunk: about 128 M logits (256 MiB in bf16) at a time, a multiple of 64, at most 4096
    (the vocabulary is a weight's static size: no guard on the tokens' count). Measured on the H200 at 4096
    tokens, d=1024, vocabulary 128256, bf16 (``scripts/gpu_lce_check.py``): 512 rows 7.41 ms, 1024 rows
    6.91 ms at the same peak, 2048 rows 6.56 ms at 0.47 GiB more."""
    return max(64, min(4096, (2 ** 27 // max(vocab, 1)) // 64 * 64))
