"""Tensors kept between calls (``core/persistent.py``): built on a worker thread where CUDA is up (so
CUDA-graph pools, which route the calling thread's allocations, never hold them), and never kept when built
under a capture. CUDA is stood in for on the CPU: the thread and the caching are what is checked here."""

import threading

import pytest
import torch

from kp_compiler.ops import block_masks, expert_addresses, fp8_weights, triton_experts
from kp_compiler.core import persistent as mod


@pytest.fixture
def cuda_up(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)

    streams = []

    class Stream:
        pass

    class Within:
        def __init__(self, s):
            streams.append(s)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    caller = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: caller)
    monkeypatch.setattr(torch.cuda, "stream", Within)
    return caller, streams


def test_on_cuda_the_value_is_made_on_another_thread_on_the_callers_stream(cuda_up):
    caller, streams = cuda_up
    threads = []
    value = mod.persistent(lambda: (threads.append(threading.get_ident()), torch.ones(3))[1])
    assert threads and threads[0] != threading.get_ident()
    assert streams == [caller]  # the allocation belongs to the caller's stream
    torch.testing.assert_close(value, torch.ones(3))


def test_without_cuda_it_is_made_here():
    threads = []
    mod.persistent(lambda: threads.append(threading.get_ident()))
    assert threads == [threading.get_ident()]


def _experts():
    x = torch.randn(4, 16)
    return x, [torch.randn(32, 16)], [torch.randn(32, 16)], [torch.randn(16, 32)]


@pytest.mark.parametrize("capture", [False, True])
def test_expert_tables_are_kept_only_outside_a_capture(monkeypatch, capture):
    monkeypatch.setattr(expert_addresses, "capturing", lambda: capture)
    expert_addresses._experts.clear()  # keyed by addresses: an earlier test's freed weights may share them
    x, G, U, Dn = _experts()
    first = triton_experts.expert_tables(x, G, U, Dn)
    again = triton_experts.expert_tables(x, G, U, Dn)
    assert first[1].tolist() == [U[0].data_ptr()]
    assert (again[1] is first[1]) is (not capture)
    bias = [torch.randn(32)]
    b1, b2 = (triton_experts.bias_tables(x, ([], bias, [])) for _ in range(2))
    assert b1[1].tolist() == [bias[0].data_ptr()] and (b2[1] is b1[1]) is (not capture)


@pytest.mark.parametrize("capture", [False, True])
def test_block_masks_and_quantized_weights_are_kept_only_outside_a_capture(monkeypatch, capture):
    monkeypatch.setattr(block_masks, "capturing", lambda: capture)
    monkeypatch.setattr(fp8_weights, "capturing", lambda: capture)
    block_masks.register("kv_idx <= q_idx", lambda b, h, q, kv: kv <= q)
    block_masks._CACHE.clear()
    block_masks.flex_block_mask("kv_idx <= q_idx", 200, 200, torch.device("cpu"))
    assert len(block_masks._CACHE) == (0 if capture else 1)
    fp8_weights.clear()
    w = torch.randn(4, 4)
    fp8_weights.cached(w, "k", lambda: w * 2)
    fp8_weights.cached(w, "k", lambda: w * 2)
    assert fp8_weights.stats["misses"] == (2 if capture else 1)


def test_the_worker_keeps_the_callers_grad_and_inference_modes(cuda_up):
    w = torch.randn(4, 4, requires_grad=True)
    with torch.no_grad():
        made = mod.persistent(lambda: w * 2)
    assert not made.requires_grad and made.grad_fn is None  # no fp32 graph kept alive behind a cached weight
    with torch.inference_mode():
        assert mod.persistent(lambda: torch.is_inference_mode_enabled())
    assert mod.persistent(lambda: torch.is_grad_enabled())


def test_a_nested_call_and_a_call_under_the_compile_lock_run_here(cuda_up):
    from torch._dynamo.convert_frame import compile_lock

    here = threading.get_ident()
    outer_thread, inner_thread = [], []

    def outer():
        outer_thread.append(threading.get_ident())
        return mod.persistent(lambda: inner_thread.append(threading.get_ident()))
    mod.persistent(outer)  # would wait on itself if the nested call went to the one worker
    assert outer_thread[0] != here and inner_thread == outer_thread
    with compile_lock:
        threads = []
        mod.persistent(lambda: threads.append(threading.get_ident()))
    assert threads == [here]


def test_to_device_under_a_capture_copies_from_pinned_memory_kept_for_the_replays(monkeypatch):
    """CUDA captures a host-to-device copy only from pinned memory, and each replay reads it again: the pinned
    copy is kept. Outside a capture it is ``host.to(device)``. (Pinning is stood in for on the CPU.)"""
    host = torch.arange(4, dtype=torch.int64)
    assert mod.to_device(host, torch.device("cpu")) is host
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (pinned.append(self.clone()), pinned[-1])[1])
    monkeypatch.setattr(mod, "capturing", lambda: True)
    kept = len(mod._PINNED)
    out = mod.to_device(host, torch.device("cpu"))
    assert out.tolist() == [0, 1, 2, 3] and pinned and mod._PINNED[-1] is pinned[-1] and len(mod._PINNED) == kept + 1
