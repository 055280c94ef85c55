"""The ``moetier`` command line.

Each subcommand lives in ``moetier/commands/<name>.py`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable taking
the parsed ``argparse.Namespace`` and returning an exit code). Commands are discovered
automatically, so adding one never touches this file.

User mistakes raise :class:`moetier.errors.MoetierError`; they are printed as one line
(``moetier: error: ...``) with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from moetier import __version__
from moetier.errors import MoetierError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetier",
        description="Run and plan Mixture-of-Experts inference over a weight hierarchy.",
    )
    parser.add_argument("--version", action="version", version=f"moetier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import moetier.commands as commands_pkg

    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"moetier.commands.{info.name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoetierError as e:
        print(f"moetier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moetier: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
