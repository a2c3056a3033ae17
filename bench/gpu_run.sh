#!/usr/bin/env bash
# One device-machine call: install the project, run a stage of the GPU benchmark, copy results to $OUT.
#   KP_GIT_COMMIT=<hash> bash bench/gpu_run.sh micro|e2e|rest|attention|next|moe|moe-graphs|moe-hf|moe-train|moe-host|moe-final|zoo-fp8|fp8|fp8-loss|gpu-time|leftover|decode|buckets|buckets-next|buckets-verify|linear-act|fp8-torchao|fp8-gated|fp8-host-cut|fp8-inductor-casts|fp8-final|fp8-profile|lce|generate|moe-save|distributed-ddp|distributed-fsdp2|distributed-tp|decode-first-pass|attention-models-infer|attention-models-train|attention-dynamic|attention-dynamic-models|attention-masked-infer|attention-masked-train|moe-suite-infer|moe-suite-train|suite-infer|suite-train|suite   (each stage stops itself before the 10-minute call limit)
set -uo pipefail
stage=${1:?micro or e2e}
budget=${2:-540}
extra=${KP_BENCH_EXTRA:-}  # e.g. --smoke for a dry run on the CPU
timing=${KP_TIMING:-latency}  # micro attention cases: latency or gpu (bench/timing.py)
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
out=${OUT:-/tmp/out}
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
case "$stage" in
  micro)
    timeout "$(left)" python3 -m bench --groups attention linear fp8-sized moe \
      --cases 'linear-*' 'moe-e8-top2' 'attention-causal' 'attention-sliding-window' 'attention-documents' 'attention-*' --backends eager inductor kernelpytorch \
      --reps 30 $extra --out "$out" --stem cuda-micro 2>"$out/micro.log" | tail -40
    ;;
  e2e)
    timeout "$(( $(left) - 150 ))" python3 -m bench --cases 'gpt-*' 'hf-llama-*' 'hf-mistral-*' 'hf-gpt2-*' 'hf-bert-*' 'moe-loop-gpt-*' --backends eager inductor kernelpytorch \
      --reps 20 $extra --out "$out" --stem cuda-e2e 2>"$out/e2e.log" | tail -20
    timeout "$(left)" python3 -m tests.zoo.conformance --device ${KP_ZOO_DEVICE:-cuda} --json-out "$out/zoo-cuda.json" 2>>"$out/e2e.log" | tail -20
    ;;
  rest)
    timeout 90 python3 -m tests.zoo.conformance --device cuda --json-out "$out/zoo-cuda-rest.json" \
      --only hf-mixtral-batched_mm hf-qwen2_moe-grouped_mm hf-qwen2_moe-batched_mm 2>"$out/rest.log" | tail -3
    timeout "$(( $(left) - 70 ))" python3 -m bench --cases 'moe-loop-gpt-*' 'moe-e64-top8-decode' 'moe-e64-top8' 'moe-*' \
      --backends eager inductor kernelpytorch --reps 20 $extra --out "$out" --stem cuda-moe 2>>"$out/rest.log" | tail -3
    timeout "$(left)" python3 -m bench --cases 'linear-gelu' 'attention-causal' --backends inductor inductor-max-autotune kernelpytorch \
      --reps 20 $extra --out "$out" --stem cuda-autotune 2>>"$out/rest.log" | tail -3
    ;;
  attention)
    # Issue 4 targets: kernelpytorch vs Inductor on the naive attention code, then the attention-heavy models.
    timeout "$(( $(left) - 240 ))" python3 -m bench --cases 'attention-causal' 'attention-sliding-window' 'attention-documents' 'attention-*' \
      --backends eager inductor kernelpytorch --reps 30 --timing "$timing" $extra --out "$out" --stem cuda-attention-$timing 2>"$out/attention.log" | tail -30
    timeout "$(left)" python3 -m bench --cases 'gpt-*' 'hf-llama-*' 'hf-mistral-*' \
      --backends eager inductor kernelpytorch --reps 20 $extra --out "$out" --stem cuda-attention-e2e 2>>"$out/attention.log" | tail -15
    ;;
  next)
    # What the 2026-11-23 session left unrun (bench/results/README.md), each row limited so a slow
    # compile cannot starve the rest; kernelpytorch also with moe-dispatch (opt-in) as its own row.
    PYTHONPATH=. timeout 150 python3 scripts/gpu_probe.py > "$out/probe.txt" 2>&1
    timeout "$(left)" python3 -m bench --cases 'moe-e64-top8' 'moe-e64-top8-decode' 'moe-e8-top2' \
      'moe-e64-top8-fwd-bwd' 'moe-e64-top8-decode-fwd-bwd' 'moe-loop-gpt-infer' 'moe-loop-gpt-train' 'hf-gpt2-*' 'hf-bert-*' \
      --backends eager inductor kernelpytorch \
      --kp-options '{"passes": ["noop-elimination", "attention-to-sdpa", "moe-dispatch"]}' \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-next 2>"$out/next.log" | tail -40
    ;;
  moe)
    # Issue 6: the routed-experts kernels' CUDA checks, then the forward cases (the loop under eager,
    # Inductor and kernelpytorch, whose default passes now include moe-dispatch) beside the
    # torch._grouped_mm reference on stacked weights.
    PYTHONPATH=. timeout 150 python3 scripts/gpu_moe_check.py > "$out/moe-check.txt" 2>&1
    timeout "$(left)" python3 -m bench --cases 'moe-e64-top8' 'moe-e64-top8-decode' 'moe-e8-top2' 'moe-ref-grouped-mm-e64-top8' \
      'moe-ref-grouped-mm-e64-top8-decode' 'moe-ref-grouped-mm-e8-top2' --backends eager inductor kernelpytorch \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-moe-fwd 2>"$out/moe.log" | tail -30
    ;;
  moe-graphs)
    # The forward cases again, default mode and reduce-overhead (CUDA graphs) on both sides.
    timeout "$(left)" python3 -m bench --cases 'moe-e64-top8-decode' 'moe-e64-top8' 'moe-e8-top2' \
      --backends inductor kernelpytorch inductor-reduce-overhead kernelpytorch-reduce-overhead \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-moe-graphs 2>"$out/moe-graphs.log" | tail -30
    ;;
  moe-hf)
    # transformers' own grouped_mm experts path (Mixtral, bench size) against Inductor.
    timeout "$(left)" python3 -m bench --cases 'hf-mixtral-grouped-mm-*' --backends inductor kernelpytorch \
      --row-timeout 200 --reps 20 $extra --out "$out" --stem cuda-moe-hf 2>"$out/moe-hf.log" | tail -10
    ;;
  leftover)
    # What no earlier stage ran at a recent commit: GPT-2 and BERT after the static-input fix, the decode fwd+bwd.
    timeout "$(left)" python3 -m bench --cases 'hf-gpt2-*' 'hf-bert-*' 'moe-e64-top8-decode-fwd-bwd' \
      --backends inductor kernelpytorch --row-timeout 170 --reps 20 $extra --out "$out" --stem cuda-leftover \
      2>"$out/leftover.log" | tail -12
    ;;
  moe-train)
    PYTHONPATH=. timeout 100 python3 scripts/gpu_moe_profile.py > "$out/moe-profile.txt" 2>&1
    timeout "$(left)" python3 -m bench --cases 'moe-e64-top8-fwd-bwd' 'moe-e8-top2-fwd-bwd' 'moe-loop-gpt-infer' \
      'moe-loop-gpt-train' 'moe-e64-top8-decode-fwd-bwd' --backends inductor kernelpytorch \
      --row-timeout 170 --reps 20 $extra --out "$out" --stem cuda-moe-train 2>"$out/moe-train.log" | tail -30
    ;;
  moe-host)
    # After the host-time cuts (one-launch schedule, CUDA key without custom_op's wrapper): diagnostics,
    # then the forward cases in default mode and under reduce-overhead on both sides.
    PYTHONPATH=. timeout 100 python3 scripts/gpu_moe_overhead.py > "$out/moe-overhead.txt" 2>&1
    PYTHONPATH=. timeout 100 python3 scripts/gpu_moe_check.py > "$out/moe-check.txt" 2>&1
    timeout "$(left)" python3 -m bench --cases 'moe-e64-top8' 'moe-e64-top8-decode' 'moe-e8-top2' \
      --backends inductor kernelpytorch inductor-reduce-overhead kernelpytorch-reduce-overhead \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-moe-host 2>"$out/moe-host.log" | tail -30
    ;;
  moe-final)
    # The whole GPU zoo (moe-dispatch is a default on CUDA now), the one-launch schedule's GPU time,
    # then the forward+backward cases and the MoE model end to end.
    timeout 170 python3 -m tests.zoo.conformance --device cuda --json-out "$out/zoo-cuda.json" 2>"$out/moe-final.log" | tail -16
    PYTHONPATH=. timeout 60 python3 -c "
import torch, kp_compiler.ops.triton_routing as r
for T, k, E in ((4096, 8, 64), (64, 8, 64), (8192, 2, 8)):
    ids = torch.randint(0, E, (T, k), device='cuda')
    for _ in range(3): r.schedule(ids, E, 128 if T > 64 else 16)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(20): r.schedule(ids, E, 128 if T > 64 else 16)
    e.record(); e.synchronize(); print(f'schedule T={T} k={k} E={E}: {s.elapsed_time(e) / 20 * 1e3:.1f} us per call (back to back)')
" 2>&1 | tail -4
    timeout "$(left)" python3 -m bench --cases 'moe-loop-gpt-infer' 'moe-loop-gpt-train' 'moe-e64-top8-fwd-bwd' 'moe-e8-top2-fwd-bwd' \
      'moe-e64-top8-decode-fwd-bwd' --backends inductor kernelpytorch \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-moe-final 2>>"$out/moe-final.log" | tail -22
    ;;
  zoo-fp8)
    # The GPU zoo after the transformers 5.17 guard fix, the FP8 kernels against their emulation,
    # then transformers' own grouped_mm Mixtral against Inductor.
    timeout 170 python3 -m tests.zoo.conformance --device cuda --json-out "$out/zoo-cuda.json" 2>"$out/zoo-fp8.log" | tail -14
    PYTHONPATH=. timeout 120 python3 scripts/gpu_fp8_check.py > "$out/fp8-check.txt" 2>&1; echo "fp8 check rc=$?"
    timeout "$(left)" python3 -m bench --cases 'hf-mixtral-grouped-mm-*' --backends inductor kernelpytorch \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-moe-hf 2>>"$out/zoo-fp8.log" | tail -12
    ;;
  fp8)
    # Issue 7: the FP8 cases (kernelpytorch with options fp8=True) against Inductor bf16, then
    # transformers' batched_mm Mixtral (moe-dispatch rewrites it) against Inductor.
    timeout "$(( $(left) - 150 ))" python3 -m bench --groups fp8 --backends inductor kernelpytorch \
      --row-timeout 200 --reps 20 $extra --out "$out" --stem cuda-fp8 2>"$out/fp8.log" | tail -24
    timeout "$(left)" python3 -m bench --cases 'hf-mixtral-batched-mm-infer' --backends inductor kernelpytorch \
      --row-timeout 140 --reps 10 $extra --out "$out" --stem cuda-moe-hf-batched 2>>"$out/fp8.log" | tail -8
    ;;
  fp8-loss)
    PYTHONPATH=. timeout "$(left)" python3 scripts/fp8_loss_curve.py --out "$out" 2>"$out/fp8-loss.log" | tail -20
    ;;
  gpu-time)
    # GPU time alone (--timing gpu: the launch hidden behind a sleep, as in a loop where the CPU runs
    # ahead): the FP8 cases, whose smallest rows are too short for latency timing, then the MoE forward cases.
    timeout "$(( $(left) - 240 ))" python3 -m bench --groups fp8 --backends inductor kernelpytorch --timing gpu \
      --row-timeout 100 --reps 30 $extra --out "$out" --stem cuda-fp8-gpu-time 2>"$out/gpu-time.log" | tail -16
    timeout "$(left)" python3 -m bench --cases 'moe-e64-top8' 'moe-e64-top8-decode' 'moe-e8-top2' --backends inductor kernelpytorch \
      --timing gpu --row-timeout 120 --reps 20 $extra --out "$out" --stem cuda-moe-gpu-time 2>>"$out/gpu-time.log" | tail -12
    ;;
  decode)
    # Issue 14: the decode sequence (six batch sizes, default and reduce-overhead), backends interleaved per
    # size; the default mode's first pass in fresh processes, cold and warm.
    timeout "$(left)" python3 -m bench.decode --out "$out" --stem cuda-decode 2>"$out/decode.log" | tail -12
    ;;
  buckets)
    # Issue 18: the decode sequence in reduce-overhead with kernelpytorch's batch buckets beside Inductor's per-size
    # graphs, after a correctness check of the bucketed graphs.
    PYTHONPATH=. timeout 200 python3 scripts/gpu_buckets_check.py > "$out/buckets-check.txt" 2>&1; echo "check rc=$?"
    timeout "$(( $(left) - 150 ))" python3 -m bench.decode --modes default reduce-overhead \
      --first-pass-modes ${KP_FIRST_PASS_MODES-reduce-overhead} --first-pass-repeats 1 --out "$out" \
      --stem cuda-decode-buckets 2>"$out/decode.log" | tail -14
    # the MoE decode layer at 64, 40, 24, 8 tokens in one step (a row per mode; the buckets row is kernelpytorch's)
    timeout "$(left)" python3 -m bench --cases moe-e64-top8-decode-dynamic \
      --backends inductor inductor-reduce-overhead kernelpytorch-reduce-overhead \
      --kp-options '{"mode": "reduce-overhead", "cudagraph_buckets": "pow2:64"}' --row-timeout 150 $extra \
      --out "$out" --stem cuda-moe-decode-buckets 2>"$out/moe-decode-buckets.log" | tail -8
    ;;
  buckets-next)
    # What issue 18 still lacks: the bucket check with explain on the GPU, then the first pass in fresh processes
    # (reduce-overhead: Inductor against the buckets row) with peak memory, then the MoE decode case again
    # (its JSON now records whether the graph was bucketed).
    PYTHONPATH=. timeout 150 python3 scripts/gpu_buckets_check.py > "$out/buckets-check.txt" 2>&1; echo "check rc=$?"
    timeout "$(( $(left) - 130 ))" python3 -m bench.decode --modes --first-pass-modes reduce-overhead \
      --first-pass-backends inductor kernelpytorch-buckets --first-pass-repeats 1 --out "$out" \
      --stem cuda-decode-first-pass-buckets 2>"$out/decode.log" | tail -8
    timeout "$(left)" python3 -m bench --cases moe-e64-top8-decode-dynamic --backends inductor inductor-reduce-overhead \
      kernelpytorch-reduce-overhead --kp-options '{"mode": "reduce-overhead", "cudagraph_buckets": "pow2:64"}' \
      --row-timeout 120 $extra --out "$out" --stem cuda-moe-decode-buckets-2 2>"$out/moe-decode-buckets.log" | tail -8
    ;;
  buckets-verify)
    # After session 8: the bucket check (its explain compiles again after Dynamo's reset, the path the pool's
    # keep-alive graph fixed), the first pass with peak memory, then generate with the token-agreement column.
    PYTHONPATH=. timeout 150 python3 scripts/gpu_buckets_check.py > "$out/buckets-check.txt" 2>&1; echo "check rc=$?"
    grep -E "batch|graph [0-9]:|peak|captured|timed" "$out/buckets-check.txt" | grep -v Warn
    timeout "$(( $(left) - 200 ))" python3 -m bench.decode --modes --first-pass-modes reduce-overhead \
      --first-pass-backends inductor kernelpytorch-buckets --first-pass-repeats 1 --out "$out" \
      --stem cuda-decode-first-pass-buckets 2>"$out/decode.log" | tail -6
    timeout "$(left)" python3 -m bench.generate --out "$out" --stem cuda-generate 2>"$out/generate.log" | tail -12
    ;;
  linear-act)
    # Issue 19: the Triton linear + activation forward against Inductor's linear + pointwise (diagnostics).
    PYTHONPATH=. timeout 200 python3 scripts/gpu_linear_act.py > "$out/linear-act.txt" 2>&1; tail -20 "$out/linear-act.txt"
    # the harness with the pass on, its ops through the Triton kernel (forced: the table has no measured shape yet)
    KP_LINEAR_ACT_KERNEL=triton timeout "$(left)" python3 -m bench --cases 'linear-gelu' 'linear-gelu-fwd-bwd' \
      'swiglu-mlp' 'swiglu-mlp-fwd-bwd' --backends inductor kernelpytorch \
      --kp-options '{"passes": ["noop-elimination", "attention-to-sdpa", "attention-kernels", "linear-activation"]}' \
      --row-timeout 120 --reps 20 $extra --out "$out" --stem cuda-linear-act 2>"$out/linear-act.log" | tail -16
    ;;
  fp8-torchao)
    # Issue 19: the FP8 cases with torchao's float8 training (tensorwise, rowwise) as rows beside Inductor bf16
    # and kernelpytorch FP8; torchao comes from .whl/ (run with carry [".whl"]).
    python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
    timeout "$(left)" python3 -m bench --groups fp8 --backends inductor kernelpytorch torchao-float8-tensorwise \
      torchao-float8-rowwise --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-fp8-torchao \
      2>"$out/fp8-torchao.log" | tail -24
    ;;
  fp8-gated)
    # Issue 19: the gated MLP's fused casts (kp::fp8_gated_mlp_train): its Triton kernels against the emulation on
    # the GPU, then the FP8 training cases with the fusion (kernelpytorch) and without (the fuse_gated=false row)
    # beside Inductor bf16 and torchao tensorwise (from .whl/: carry [".whl"]), then kernelpytorch's profile.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_fp8_gated.py > "$out/fp8-gated-check.txt" 2>&1
    tail -2 "$out/fp8-gated-check.txt"
    timeout "$(( $(left) - 60 ))" python3 -m bench --cases fp8-swiglu-mlp-fwd-bwd fp8-llama2-train \
      --backends inductor kernelpytorch torchao-float8-tensorwise --kp-options '{"fp8": {"fuse_gated": false}}' \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-fp8-gated 2>"$out/fp8-gated.log" | tail -16
    PYTHONPATH="${PYTHONPATH:-}:." timeout "$(left)" python3 scripts/gpu_fp8_profile.py --case mlp --backends kernelpytorch \
      > "$out/fp8-gated-profile.txt" 2>&1
    grep -E "^==|^  [A-Za-z]" "$out/fp8-gated-profile.txt" | head -10
    ;;
  fp8-host-cut)
    # Issue 19: the tensorwise scale from the amax kernel's last program (no zero fill, one launch fewer host
    # calls per cast): the cast tests on the GPU, host time per piece, the cast tiles on this GPU, then the FP8
    # training cases beside Inductor bf16 and torchao tensorwise (from .whl/: carry [".whl"]), then host vs GPU time.
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_fp8.py > "$out/fp8-cast-check.txt" 2>&1
    tail -2 "$out/fp8-cast-check.txt"
    PYTHONPATH="${PYTHONPATH:-}:." timeout 60 python3 scripts/gpu_fp8_overhead.py --cases ops > "$out/fp8-ops-host.txt" 2>&1
    grep "^op" "$out/fp8-ops-host.txt"
    timeout "$(( $(left) - 200 ))" python3 -m bench --cases fp8-swiglu-mlp-fwd-bwd fp8-llama2-train \
      --backends inductor kernelpytorch torchao-float8-tensorwise \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-fp8-host-cut 2>"$out/fp8-host-cut.log" | tail -10
    PYTHONPATH="${PYTHONPATH:-}:." timeout "$(( $(left) - 100 ))" python3 scripts/gpu_fp8_host.py --case llama \
      --backends inductor kernelpytorch torchao-float8-tensorwise > "$out/fp8-host.txt" 2>&1
    grep -iE "wall|queued" "$out/fp8-host.txt" | head -8
    PYTHONPATH="${PYTHONPATH:-}:." timeout "$(left)" python3 scripts/gpu_fp8_cast_tune.py > "$out/fp8-cast-tune.txt" 2>&1
    tail -3 "$out/fp8-cast-tune.txt"
    ;;
  fp8-inductor-casts)
    # Issue 19: the FP8 training ops handed to Inductor as ATen ops (options["fp8"]["casts"]="inductor") beside the
    # ops' own Triton casts, Inductor bf16 and torchao tensorwise (from .whl/: carry [".whl"]); then host vs GPU time.
    timeout "$(( $(left) - 170 ))" python3 -m bench --cases fp8-swiglu-mlp-fwd-bwd fp8-llama2-train \
      --backends inductor kernelpytorch torchao-float8-tensorwise --kp-options '{"fp8": {"casts": "inductor"}}' \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-fp8-inductor-casts 2>"$out/fp8-inductor-casts.log" | tail -14
    PYTHONPATH="${PYTHONPATH:-}:." timeout "$(left)" python3 scripts/gpu_fp8_host.py --case mlp llama --rows 12 \
      --backends kernelpytorch kernelpytorch-inductor-casts torchao-float8-tensorwise > "$out/fp8-host.txt" 2>&1
    grep -E "^===" "$out/fp8-host.txt" | head -8
    ;;
  fp8-final)
    # Issue 19 at its last commit: the decomposed training ops against the ops' kernels on CUDA, then the whole
    # FP8 group beside Inductor bf16 and torchao tensorwise (from .whl/: carry [".whl"]).
    PYTHONPATH="${PYTHONPATH:-}:." timeout 150 python3 scripts/gpu_fp8_traced_check.py > "$out/fp8-traced-check.txt" 2>&1
    echo "traced check rc=$?"; grep -E "^block|^Llama|Error" "$out/fp8-traced-check.txt" | head -6
    timeout "$(left)" python3 -m bench --groups fp8 --backends inductor kernelpytorch torchao-float8-tensorwise \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-fp8-final 2>"$out/fp8-final.log" | tail -22
    ;;
  fp8-profile)
    # Issue 19: where kernelpytorch FP8 and torchao tensorwise spend the SwiGLU MLP's forward+backward, by kernel
    # group (FP8 GEMMs, casts, the rest); torchao from .whl/ (carry [".whl"]).
    PYTHONPATH="${PYTHONPATH:-}:." timeout "$(left)" python3 scripts/gpu_fp8_profile.py --case mlp \
      --backends kernelpytorch torchao-float8-tensorwise inductor > "$out/fp8-profile.txt" 2>&1
    grep -E "^==|^  [A-Za-z]" "$out/fp8-profile.txt" | head -30
    ;;
  lce)
    # Issue 20: the 128k-vocabulary training steps (the loss-only step), kernelpytorch with linear-cross-entropy
    # beside Inductor and Liger's fused linear cross-entropy (from .whl/: carry [".whl"]), peak memory per row.
    timeout "$(left)" python3 -m bench --groups loss --backends inductor kernelpytorch liger --row-timeout 200 \
      --reps 10 $extra --out "$out" --stem cuda-lce 2>"$out/lce.log" | tail -12
    ;;
  generate)
    # Issue 18 item 5: transformers' generate with a static KV cache at batch 1, 3, 8, 13 (its own compile of the
    # decode step, per row's compile_config), rows interleaved.
    timeout "$(left)" python3 -m bench.generate --out "$out" --stem cuda-generate 2>"$out/generate.log" | tail -14
    ;;
  distributed-ddp|distributed-fsdp2|distributed-tp)
    # Issue 21, on the 2-GPU machine (kind nvidia-h200-x2; NCCL settings as they are): one wrapping per call,
    # eager, Inductor, kernelpytorch and kernelpytorch FP8, 50 steps each from the same seed.
    timeout "$(left)" python3 -m bench.distributed --configs "${stage#distributed-}" --steps 50 --out "$out" \
      --stem "cuda-${stage}" 2>"$out/${stage}.log" | tail -10
    ;;
  decode-first-pass)
    timeout "$(left)" python3 -m bench.decode --modes --first-pass-modes default --out "$out" --stem cuda-decode-first-pass \
      2>"$out/decode.log" | tail -8
    ;;
  attention-models-infer|attention-models-train)
    # Issue 16: Mistral (sdpa, window 1024) and Gemma2 (softcapped) at 2 x 4096, each beside transformers' own
    # flex_attention path under Inductor (the peer rows), in one process.
    kind=${stage#attention-models-}
    timeout "$(( $(left) - 10 ))" python3 -m bench --groups models --cases "model-mistral-window-$kind" \
      "model-mistral-window-hf-flex-$kind" "model-gemma2-4096-$kind" "model-gemma2-4096-eager-$kind" \
      "model-gemma2-4096-hf-flex-$kind" \
      --backends inductor kernelpytorch --row-timeout 200 --reps 20 $extra --out "$out" \
      --stem cuda-attention-models-$kind 2>>"$out/attention-models.log" | tail -20
    ;;
  attention-masked-infer|attention-masked-train)
    # Issue 16: transformers' Llama with a padded batch and with packed documents (masks that read data),
    # kernelpytorch vs Inductor, transformers' own flex path as the peer; the GPU check of those masks first.
    kind=${stage#attention-masked-}
    [ "$kind" = infer ] && PYTHONPATH=. timeout 200 python3 scripts/gpu_data_mask_check.py > "$out/data-mask-check.txt" 2>&1; tail -8 "$out/data-mask-check.txt" 2>/dev/null
    timeout "$(( $(left) - 10 ))" python3 -m bench --groups models --cases "model-llama3-padded-$kind" \
      "model-llama3-padded-hf-flex-$kind" "model-llama3-packed-$kind" "model-llama3-packed-hf-flex-$kind" \
      --backends inductor kernelpytorch --row-timeout 150 --reps 20 $extra --out "$out" \
      --stem cuda-attention-masked-$kind 2>>"$out/attention-masked.log" | tail -16
    ;;
  attention-dynamic)
    # Issue 16: the naive attention at three lengths per step, every dim dynamic (one compile), vs Inductor.
    timeout "$(( $(left) - 10 ))" python3 -m bench --cases 'attention-causal-dynamic' 'attention-causal-dynamic-fwd-bwd' \
      'attention-sliding-window-dynamic' 'attention-sliding-window-dynamic-fwd-bwd' 'attention-sliding-window-attr-dynamic' \
      'attention-sliding-window-attr-dynamic-fwd-bwd' --backends inductor kernelpytorch \
      --row-timeout 150 --reps 20 $extra --out "$out" --stem cuda-attention-dynamic 2>"$out/attention-dynamic.log" | tail -24
    ;;
  attention-dynamic-models)
    # Issue 16: Mistral (sdpa, window 1024) at three lengths per step, every dim dynamic, beside Inductor and
    # transformers' own flex path (Inductor only).
    timeout "$(( $(left) - 10 ))" python3 -m bench --groups models --cases 'model-mistral-window-dynamic*' \
      --backends inductor kernelpytorch --row-timeout 200 $extra --out "$out" --stem cuda-attention-dynamic-models \
      2>"$out/attention-dynamic-models.log" | tail -24
    ;;
  moe-save)
    # Issue 17: the saved pre-activations of kp::routed_experts_train. The layer cases with Inductor, then
    # kernelpytorch alone with the Triton forward keeping them past 16 experts (KP_MOE_SAVE_TRITON=1): an A/B
    # in two processes against the first run's kernelpytorch rows.
    timeout "$(( $(left) / 2 ))" python3 -m bench --cases 'moe-e8-top2-fwd-bwd' 'moe-e64-top8-fwd-bwd' \
      'moe-e64-top8-decode-fwd-bwd' --backends inductor kernelpytorch --row-timeout 130 --reps 20 $extra \
      --out "$out" --stem cuda-moe-save 2>"$out/moe-save.log" | tail -8
    KP_MOE_SAVE_TRITON=1 timeout "$(( $(left) - 10 ))" python3 -m bench --cases 'moe-e64-top8-fwd-bwd' \
      'moe-e64-top8-decode-fwd-bwd' --backends kernelpytorch --row-timeout 100 --reps 20 $extra \
      --out "$out" --stem cuda-moe-save-triton 2>>"$out/moe-save.log" | tail -6
    ;;
  moe-suite-infer|moe-suite-train)
    # Issue 17: transformers' MoE models with their default experts, kernelpytorch as shipped (grouped_mm kept)
    # and with the grouped_mm form rewritten, beside Inductor in one process.
    kind=${stage#moe-suite-}
    timeout "$(( $(left) - 10 ))" python3 -m bench --groups models --cases "model-qwen3-moe-$kind" "model-mixtral-$kind" \
      "model-olmoe-$kind" "model-deepseek-v3-$kind" --backends inductor kernelpytorch \
      --kp-options '{"moe_grouped_mm": "rewrite"}' --row-timeout 150 $extra --out "$out" --stem "cuda-moe-suite-$kind" \
      2>"$out/moe-suite-$kind.log" | tail -30
    ;;
  suite-infer|suite-train|suite)
    # Issue 14: the real-model suite (transformers defaults), kernelpytorch beside Inductor, interleaved rounds.
    kinds=$([ "$stage" = suite ] && echo "infer train" || echo "${stage#suite-}")
    for kind in $kinds; do
      timeout "$(( $(left) - 10 ))" python3 -m bench --groups models --cases "model-*-$kind" --backends inductor kernelpytorch \
        --row-timeout 200 --reps 30 $extra --out "$out" --stem cuda-models-$kind 2>>"$out/suite.log" | tail -14
    done
    ;;
esac
echo "stage $stage done after $(( $(date +%s) - start )) s"
