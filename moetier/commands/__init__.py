"""CLI subcommands, one module each, discovered by moetier.cli (see its docstring)."""
