"""``kp-explain FILE.py``: the ``explain`` table for a model defined in a file.

The file defines a function (``kp_example`` unless ``--entry`` names another)
that returns ``(model_or_fn, example_inputs)``::

    # my_model.py
    def kp_example():
        model = MyModel()
        return model, (torch.randn(4, 128),)

    $ kp-explain my_model.py --option lowering=eager --json report.json

``python -m kp_compiler explain FILE.py`` does the same.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import runpy
import sys
from typing import Optional, Sequence


def _parse_option(text: str):
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kp-explain", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="a Python file defining the entry function")
    parser.add_argument("--entry", default="kp_example", help="function returning (model, inputs)")
    parser.add_argument("--option", action="append", default=[], type=_parse_option,
                        metavar="KEY=VALUE", help="a backend option (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.file):
        print(f"kp-explain: {args.file}: no such file", file=sys.stderr)
        return 2
    # As `python FILE.py` would: the file's folder first on sys.path, so its sibling modules import.
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.file)))
    namespace = runpy.run_path(args.file, run_name="__kp_explain__")
    entry = namespace.get(args.entry)
    if not callable(entry):
        parser.error(f"{args.file} defines no function {args.entry!r} returning (model, example_inputs)")
    model, inputs = entry()
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)

    from .explain import explain

    report = explain(model, *inputs, **dict(args.option))
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
