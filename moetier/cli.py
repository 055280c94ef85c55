"""The ``moetier`` command line.

Each subcommand lives in ``moetier/commands/<name>.py`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable taking
the parsed ``argparse.Namespace`` and returning an exit code). Commands are discovered
automatically, so adding one never touches this file.

User mistakes raise :class:`moetier.errors.MoetierError`; they are printed as one line
(``moetier: error: ...``) with exit code 2, never as a traceback; so are the OS's errors about
files the user named (missing, unreadable, not writable, not UTF-8).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Any, NoReturn

from moetier import __version__
from moetier.errors import MoetierError


class Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; keeps text with line breaks (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line + "\n" for line in text.splitlines()).rstrip("\n")
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``moetier run: error: ... (see moetier run --help)``), exit 2,
    and :class:`Formatter` by default. Subcommand parsers are made with the same class; their
    ``epilog`` holds runnable examples (tests/test_readme_commands.py runs every line that
    starts with ``moetier``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was parsed (expert parallelism respawns it)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoetierError as e:
        print(f"moetier: error: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as e:  # a file the user named cannot be read / written
        if isinstance(e, BrokenPipeError):
            return 0
        print(f"moetier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moetier: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
