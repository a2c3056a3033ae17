"""Hugging Face transformers models from small configs, random weights, no downloads.

``build(name, size)`` returns ``(model, vocab)``; ``size`` is ``"tiny"`` (CPU
tests and smoke runs), ``"bench"`` (the GPU benchmark: the anchors' 8-layer
d=1024 Llama shape and peers of similar cost), ``"suite"`` (the real-model
suite: 4 layers of d=1024, Qwen3-MoE with 64 experts top-8) or ``"decode"``
(the decode sequence's d=2048 Llama). ``attn=None`` / ``experts=None`` keep
transformers' own defaults: the models as users run them.
"""

from __future__ import annotations

_MOE = dict(moe_ffn=768, top_k=8)
SIZES = {
    "tiny": dict(d=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, positions=128, window=16, experts=4,
                 moe_ffn=32, top_k=2),
    "bench": dict(d=1024, layers=8, heads=16, kv_heads=4, ffn=2816, vocab=32000, positions=2048, window=512,
                  experts=16, **_MOE),
    "suite": dict(d=1024, layers=4, heads=16, kv_heads=4, ffn=2816, vocab=32000, positions=4096, window=1024,
                  experts=64, **_MOE),
    # the decode sequence of issue 14 (HF Llama d=2048, 8 layers, GQA 16/4)
    "decode": dict(d=2048, layers=8, heads=16, kv_heads=4, ffn=5632, vocab=32000, positions=2048, window=512,
                   experts=16, **_MOE),
}

# experts_implementation values that capture in one Dynamo graph (the eager
# experts loop iterates over a nonzero() result and graph-breaks).
EXPERTS_ONE_GRAPH = ("grouped_mm", "batched_mm")


def _llama_like(cfg_cls, s, **extra):
    return cfg_cls(
        vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=s["positions"], **extra,
    )


def config(name: str, size: str = "tiny"):
    import transformers as tf

    s = SIZES[size]
    if name == "llama":
        return _llama_like(tf.LlamaConfig, s)
    if name == "llama3":
        return _llama_like(tf.LlamaConfig, s, rope_theta=500000.0)
    if name == "qwen3_moe":
        return _llama_like(tf.Qwen3MoeConfig, s, num_experts=s["experts"], num_experts_per_tok=s["top_k"],
                           moe_intermediate_size=s["moe_ffn"], head_dim=s["d"] // s["heads"])
    if name == "gemma2":  # softcapped attention (its default is the eager path), sliding window on alternate layers
        return _llama_like(tf.Gemma2Config, s, head_dim=s["d"] // s["heads"], sliding_window=s["window"])
    if name == "mistral":
        return _llama_like(tf.MistralConfig, s, sliding_window=s["window"])
    if name == "olmoe":  # 64 experts top-8, softmax routing without renormalising
        return _llama_like(tf.OlmoeConfig, {**s, "ffn": s["moe_ffn"]}, num_experts=s["experts"],
                           num_experts_per_tok=s["top_k"], eos_token_id=0)
    if name == "deepseek_v3":  # sigmoid routing with a selection bias, group-limited top-k, a shared expert, MLA
        heads = s["heads"]
        return tf.DeepseekV3Config(
            vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["ffn"], moe_intermediate_size=s["moe_ffn"],
            num_hidden_layers=s["layers"], num_attention_heads=heads, num_key_value_heads=heads,
            n_routed_experts=s["experts"], num_experts_per_tok=s["top_k"], n_shared_experts=1,
            first_k_dense_replace=0, n_group=4 if s["experts"] >= 32 else 1, topk_group=2 if s["experts"] >= 32 else 1,
            bos_token_id=0, eos_token_id=0,
            q_lora_rank=s["d"] // 2, kv_lora_rank=s["d"] // 4, qk_rope_head_dim=s["d"] // heads // 2,
            qk_nope_head_dim=s["d"] // heads // 2, v_head_dim=s["d"] // heads,
            max_position_embeddings=s["positions"])
    if name == "mixtral":  # the suite takes Mixtral's own 8 experts top-2
        return _llama_like(tf.MixtralConfig, s, num_local_experts=8 if size == "suite" else s["experts"],
                           num_experts_per_tok=2)
    if name == "qwen2_moe":
        return _llama_like(
            tf.Qwen2MoeConfig, s, num_experts=s["experts"], num_experts_per_tok=2,
            moe_intermediate_size=s["ffn"] // 2, shared_expert_intermediate_size=s["ffn"],
            decoder_sparse_step=1, mlp_only_layers=[],
        )
    if name == "recurrent_gemma":  # SqrtBoundDerivative, a custom autograd.Function, in its recurrent blocks
        return tf.RecurrentGemmaConfig(
            vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["ffn"], num_hidden_layers=3,
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], lru_width=s["d"],
            attention_window_size=s["window"], block_types=["recurrent", "recurrent", "attention"],
        )
    if name == "bloom":  # GeLUFunction, a custom autograd.Function, in training mode
        return tf.BloomConfig(vocab_size=s["vocab"], hidden_size=s["d"], n_layer=s["layers"], n_head=s["heads"])
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=s["vocab"], n_embd=s["d"], n_layer=s["layers"], n_head=s["heads"],
                             n_positions=s["positions"], bos_token_id=0, eos_token_id=0)
    if name == "bert":
        return tf.BertConfig(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
                             num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                             max_position_embeddings=s["positions"])
    raise ValueError(f"unknown model {name!r}")


def build(name: str, size: str = "tiny", attn: str | None = "eager", experts: str | None = None):
    """A randomly initialised model in eval mode (dropout off), and its vocab size.

    ``attn=None`` and ``experts=None`` leave transformers' defaults in place.
    """
    import torch
    import transformers as tf

    cfg = config(name, size)
    kwargs = {}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if experts is not None:
        kwargs["experts_implementation"] = experts
    torch.manual_seed(0)
    auto = tf.AutoModelForMaskedLM if name == "bert" else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, **kwargs)
    return model.eval(), cfg.vocab_size
