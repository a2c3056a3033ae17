"""Option parsing: every bad key or value is a ValueError that names it."""

import pytest
import torch

import kp_compiler
from kp_compiler.lowering.inductor import mode_config
from kp_compiler.options import VALID_KEYS, parse_options


def test_defaults(monkeypatch):
    monkeypatch.delenv("KP_DUMP_DIR", raising=False)
    opts = parse_options()
    assert (opts.lowering, opts.passes, opts.dump_dir, opts.strict, opts.verify, opts.mode) == (
        "auto", None, None, False, False, "default")


def test_env_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KP_DUMP_DIR", str(tmp_path))
    assert parse_options().dump_dir == str(tmp_path)
    assert parse_options(options={"dump_dir": "elsewhere"}).dump_dir == "elsewhere"


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        parse_options(options={"lowerin": "eager"})
    assert "lowerin" in str(err.value)
    for key in VALID_KEYS:
        assert key in str(err.value)


@pytest.mark.parametrize("key, value, needle", [
    ("lowering", "tpu", "'inductor'"),
    ("mode", "fast", "'reduce-overhead'"),
    ("strict", "yes", "strict"),
    ("verify", 1, "verify"),
    ("passes", "noop-elimination", "list of pass names"),
    ("inductor_config", {"not_a_config_key": 1}, "not_a_config_key"),
    ("flex_kernel_options", "fast", "'auto' or a dict"),
    ("flex_kernel_options", {1: 64}, "'auto' or a dict"),
    ("moe_grouped_mm", True, "'rewrite'"),
])
def test_bad_values(key, value, needle):
    with pytest.raises(ValueError, match=key) as err:
        parse_options(options={key: value})
    assert needle in str(err.value)


def test_mode_as_option_and_argument():
    assert parse_options(options={"mode": "max-autotune"}).mode == "max-autotune"
    assert parse_options(mode="reduce-overhead").mode == "reduce-overhead"
    with pytest.raises(ValueError, match="disagree"):
        parse_options(mode="reduce-overhead", options={"mode": "max-autotune"})


def test_mode_maps_to_inductor_settings():
    assert mode_config("default") == {}
    assert mode_config("reduce-overhead")["triton.cudagraphs"] is True
    assert mode_config("max-autotune")["max_autotune"] is True
    assert mode_config("max-autotune-no-cudagraphs").get("triton.cudagraphs", False) is False


def test_unknown_pass_lists_registered():
    with pytest.raises(ValueError) as err:
        kp_compiler.core.pass_manager.resolve(["noop-elimination", "no-such-pass"])
    assert "no-such-pass" in str(err.value) and "noop-elimination" in str(err.value)


def test_errors_reach_the_torch_compile_caller():
    """A bad option stops compilation with the ValueError's message (Dynamo wraps it)."""
    f = torch.compile(torch.nn.Linear(4, 4), backend="kernelpytorch", options={"bogus": 1})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['bogus'\]") as err:
        f(torch.randn(2, 4))
    inner = getattr(err.value, "inner_exception", err.value)  # Dynamo's BackendCompilerFailed wraps it
    assert isinstance(inner, ValueError)
    f = torch.compile(torch.nn.Linear(4, 4), backend="kernelpytorch", options={"passes": ["nope"]})
    with pytest.raises(Exception, match="registered passes"):
        f(torch.randn(2, 4))


@pytest.mark.parametrize("options, needle", [
    ({"passes": 3}, "options['passes']"),
    ({"fp8": {"include": 3}}, "options['fp8']['include']"),
    ({"fp8": {"exclude": None}}, "options['fp8']['exclude']"),
    ({"fp8": {"min_dims": 5}}, "options['fp8']['min_dims']"),
    ({"fp8": {"min_dims": [1, 2, True]}}, "options['fp8']['min_dims']"),
])
def test_bad_container_values_are_value_errors(options, needle):
    """Issue 14: these raised TypeError from inside the check."""
    with pytest.raises(ValueError) as err:
        parse_options(options=options)
    assert needle in str(err.value)


def test_a_dump_dir_that_cannot_be_used_is_a_value_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"options\['dump_dir'\].*not a folder"):
        parse_options(options={"dump_dir": str(blocker)})
    with pytest.raises(ValueError, match=r"options\['dump_dir'\].*cannot be created"):
        parse_options(options={"dump_dir": str(blocker / "below")})


def test_the_options_table_is_generated_from_the_option_data():
    """Every ``Options`` field has a row in ``OPTION_DOCS``, and docs/architecture.md shows that table."""
    from pathlib import Path

    from kp_compiler import options

    assert [k for k, _, _ in options.OPTION_DOCS] and {k for k, _, _ in options.OPTION_DOCS} == set(options.VALID_KEYS)
    text = (Path(options.__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    assert options.options_markdown() in text, "run: python -m kp_compiler.options"
