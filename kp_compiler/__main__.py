"""``python -m kp_compiler explain FILE.py`` (see ``kp_compiler.explain_cli``)."""

import sys

from .explain_cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "explain":
        print("usage: python -m kp_compiler explain FILE.py [--entry NAME] [--option KEY=VALUE] [--json PATH]")
        sys.exit(2)
    sys.exit(main(args[1:]))
