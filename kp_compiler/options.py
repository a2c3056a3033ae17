"""The backend's options: ``torch.compile(..., mode=..., options={...})``.

``Options`` holds them parsed; ``OPTION_DOCS`` says what each takes, and the options table in
``docs/architecture.md`` is generated from it (``python -m kp_compiler.options``; a test keeps the two
equal and checks that every ``Options`` field has a row).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .core.bucket_policy import bucket_sizes
from .core.fp8_options import FP8Options, parse_fp8

LOWERINGS = ("auto", "inductor", "eager", "xla")
ATTENTION_KERNELS = ("auto", "sdpa", "flex")
MOE_GROUPED_MM = ("auto", "keep", "rewrite")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Options:
    lowering: str = "auto"
    passes: Optional[tuple] = None
    dump_dir: Optional[str] = None
    strict: bool = False
    verify: bool = False
    mode: str = "default"
    inductor_config: dict = field(default_factory=dict)
    attention_kernel: str = "auto"
    flex_kernel_options: Any = "auto"
    moe_grouped_mm: str = "auto"
    cudagraph_buckets: Any = None
    fp8: Optional[FP8Options] = None  # core/fp8_options.py
    linear_cross_entropy: Any = "auto"
    constant_buffers: bool = False
    pass_timeout_s: Optional[float] = None


VALID_KEYS = tuple(Options.__dataclass_fields__)

OPTION_DOCS = (  # (key, values, default), markdown; docs/architecture.md's table is generated from it
    ('lowering',
     '`"auto"`, `"inductor"`, `"eager"`, `"xla"`',
     '`"auto"`: XLA for tensors on an XLA device, else Inductor (CUDA, ROCm, XPU, MPS, CPU)'),
    ('passes',
     'list of registered pass names, run in that order',
     '`kp_compiler.default_passes()`'),
    ('dump_dir',
     'folder for dumps and `report.json`; a `ValueError` if it cannot be created or written (an unusable `$KP_DUMP_DIR` only warns, once, and compiles without dumps)',
     '`$KP_DUMP_DIR`, else off'),
    ('strict',
     '`True`: a failing pass or fallback raises, and so does a pass that adds a shape guard',
     '`False`'),
    ('verify',
     "`True`: compare each pass's graph before/after on random inputs (not inside activation-checkpointed bodies, whose inputs are values inside the graph)",
     '`False`'),
    ('mode',
     '`"default"`, `"reduce-overhead"` (CUDA graphs through Inductor), `"max-autotune"`, `"max-autotune-no-cudagraphs"`',
     '`"default"`'),
    ('inductor_config',
     "dict of `torch._inductor.config` keys, applied after the mode's",
     '`{}`'),
    ('pass_timeout_s',
     'seconds after which a running pass is interrupted (at its next Python bytecode) and rolled back; either way a pass still running after 30 s is named in a warning',
     '`None`'),
    ('constant_buffers',
     "`True`: registered buffers are constants a rewrite may rely on (nanoGPT's `tril` mask becomes `is_causal` under a version guard; writes through `.data` are not seen)",
     '`False`'),
    ('attention_kernel',
     '`"auto"` (the table in `passes/attention/kernel_table.py`), `"sdpa"` (never FlexAttention), `"flex"` (FlexAttention wherever it can run, the CPU included)',
     '`"auto"`'),
    ('flex_kernel_options',
     '`"auto"` (flex\'s own heuristics: no tuned options measured faster in a model step, see `passes/attention/kernel_table.py`), or a dict passed to every `flex_attention` call as its `kernel_options` (`{}`: flex\'s own heuristics everywhere)',
     '`"auto"`'),
    ('moe_grouped_mm',
     '`"auto"` (transformers\' `grouped_mm` experts rewritten into `kp::routed_experts` in inference graphs, left as they are in training graphs, where the routed op measured slower: see [docs/passes/moe.md](passes/moe.md)), `"keep"` (left as they are everywhere), `"rewrite"` (rewritten everywhere; `$KP_MOE_REWRITE_GROUPED_MM=1` does the same)',
     '`"auto"`'),
    ('cudagraph_buckets',
     '`None` (off), a list of batch sizes, or `"pow2:<max>"`: with `mode="reduce-overhead"` on CUDA, an inference graph whose rows are proven independent along a dynamic batch is captured once per bucket and replayed with its inputs padded (see [docs/passes/cudagraphs.md](passes/cudagraphs.md)); other graphs keep Inductor\'s CUDA graphs, and the report says why',
     '`None`'),
    ('linear_cross_entropy',
     '`"auto"` (the `linear-cross-entropy` pass rewrites LM heads of at least 128000 classes in training graphs on CUDA GPUs of compute capability 9.0 and up, where it is measured: see [docs/passes/linear-cross-entropy.md](passes/linear-cross-entropy.md)), `True` (any head, training graphs on any device), `False` (off)',
     '`"auto"`'),
    ('fp8',
     '`None` (off), `True`, or a dict: `recipe` (`"tensorwise"` (default), `"rowwise"`, `"delayed"`, `"static"`: see [docs/passes/fp8.md](passes/fp8.md)), `include` / `exclude` (globs on module paths), `emulate` (bool: convert on any device through the exact emulation), `min_dims` (`[M, K, N]` thresholds replacing the device\'s size-table row), `history_len` (delayed: amax history length, 1 to 1024, default 16), `margin` (delayed: scale headroom in powers of 2, 0 to 8, default 0), `fast_accum` (bool, default `True`: the forward GEMM accumulates with the GPU\'s fast FP8 mode; gradients never do), `fuse_gated` (bool, default `False`: in training graphs with the default recipe, a SwiGLU/GEGLU MLP whose three linears convert runs as one op with the gated product\'s casts fused; measured 2-3% slower on the H200, see docs/passes/fp8.md), `casts` (`"inductor"` (default): in CUDA training graphs with the default recipe lowered by Inductor, the FP8 ops go to Inductor as ATen ops, which generates the casts and fuses them into their neighbours; `"ops"`: the ops run their own kernels, Triton casts on CUDA; see docs/passes/fp8.md)',
     '`None`'),
)


def options_markdown() -> str:
    """The options table, as ``docs/architecture.md`` shows it."""
    rows = ["| key | values | default |", "|---|---|---|"]
    rows += [f"| `{key}` | {values} | {default} |" for key, values, default in OPTION_DOCS]
    return "\n".join(rows) + "\n"


def parse_options(mode: Optional[str] = None, options: Optional[Mapping[str, Any]] = None) -> Options:
    """Validate ``mode`` and ``options``; raise ``ValueError`` naming the bad key."""
    options = dict(options or {})
    unknown = sorted(k for k in options if k not in VALID_KEYS)
    if unknown:
        raise ValueError(
            f"kernelpytorch: unknown option(s) {unknown}; valid options are {list(VALID_KEYS)}"
        )
    if mode is not None and options.get("mode", mode) != mode:
        raise ValueError(f"kernelpytorch: mode={mode!r} and options['mode']={options['mode']!r} disagree")
    mode = options.pop("mode", mode) or "default"
    _check_choice("mode", mode, MODES)
    _check_choice("lowering", options.get("lowering", "auto"), LOWERINGS)
    _check_choice("attention_kernel", options.get("attention_kernel", "auto"), ATTENTION_KERNELS)
    _check_choice("moe_grouped_mm", options.get("moe_grouped_mm", "auto"), MOE_GROUPED_MM)
    flex_options = options.get("flex_kernel_options", "auto")
    if flex_options != "auto" and not (isinstance(flex_options, dict) and all(isinstance(k, str) for k in flex_options)):
        raise ValueError(f"kernelpytorch: options['flex_kernel_options'] must be 'auto' or a dict of flex_attention "
                         f"kernel_options, got {flex_options!r}")
    timeout = options.get("pass_timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"kernelpytorch: options['pass_timeout_s'] must be a positive number of seconds or None, "
                         f"got {timeout!r}")
    lce = options.get("linear_cross_entropy", "auto")
    if not (lce == "auto" or isinstance(lce, bool)):
        raise ValueError(f"kernelpytorch: options['linear_cross_entropy'] must be 'auto', True or False, got {lce!r}")
    for key in ("strict", "verify", "constant_buffers"):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"kernelpytorch: options[{key!r}] must be True or False, got {options[key]!r}")
    passes = options.get("passes")
    if passes is not None:
        if not _string_list(passes):
            raise ValueError(f"kernelpytorch: options['passes'] must be a list of pass names, got {passes!r}")
        options["passes"] = tuple(passes)
    options["dump_dir"] = _dump_dir(options)
    if "fp8" in options:
        options["fp8"] = parse_fp8(options["fp8"])
    if options.get("cudagraph_buckets") is not None:
        try:
            options["cudagraph_buckets"] = tuple(bucket_sizes(options["cudagraph_buckets"]))
        except ValueError as e:
            raise ValueError(f"kernelpytorch: options['cudagraph_buckets']: {e}") from None
    inductor_config = options.get("inductor_config", {})
    _check_inductor_config(inductor_config)
    options["inductor_config"] = dict(inductor_config)
    return Options(mode=mode, **options)


def _string_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


_warned_env_dump: set = set()


def _dump_dir(options: dict) -> Optional[str]:
    """``options['dump_dir']`` (a ValueError if it cannot be written) or ``$KP_DUMP_DIR`` (a warning, once,
    and no dumps if it cannot be written: an environment variable must never stop a user's run)."""
    if "dump_dir" in options:
        path = options["dump_dir"]
        if path is None:
            return None
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"kernelpytorch: options['dump_dir'] must be a path, got {path!r}")
        why = _unwritable(os.fspath(path))
        if why:
            raise ValueError(f"kernelpytorch: options['dump_dir']={os.fspath(path)!r} cannot be used: {why}")
        return os.fspath(path)
    path = os.environ.get("KP_DUMP_DIR") or None
    if path is None:
        return None
    why = _unwritable(path)
    if not why:
        return path
    if path not in _warned_env_dump:
        _warned_env_dump.add(path)
        warnings.warn(f"kernelpytorch: KP_DUMP_DIR={path!r} cannot be used ({why}); compiling without dumps",
                      RuntimeWarning, stacklevel=3)
    return None


def _unwritable(path: str) -> str:
    """Why ``path`` cannot hold dumps ('' if it can): created if missing, and writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "it exists and is not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"it cannot be created ({e.strerror or e})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable"
    return ""


def _check_choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"kernelpytorch: {key}={value!r} is not valid; choose one of {list(valid)}")


def _check_inductor_config(patches: Any) -> None:
    if not isinstance(patches, Mapping):
        raise ValueError(f"kernelpytorch: options['inductor_config'] must be a dict, got {patches!r}")
    from torch._inductor import config

    known = set(config.get_config_copy())
    unknown = sorted(k for k in patches if k not in known)
    if unknown:
        raise ValueError(f"kernelpytorch: unknown Inductor config key(s) {unknown} in options['inductor_config']")


if __name__ == "__main__":
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
    text = path.read_text()
    begin, end = "<!-- options table: python -m kp_compiler.options -->\n", "<!-- end of options table -->"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: begin + options_markdown() + end, text, flags=re.S)
    path.write_text(text)
    print(f"wrote the options table in {path}")
