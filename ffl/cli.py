"""One shape for the library's command lines (``python -m ffl.zoo``, ``ffl.bench``, ``ffl.book``): a
subcommand per job, each with its own options, ``--help`` listing them; each subcommand calls the
module's public functions only."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, a one-line help, a function adding its options to a parser, and
    the function that runs it (returns the exit status)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def run_command_line(prog: str, description: str, commands: Sequence[Command],
                     argv: Sequence[str] | None = None, *, default: str | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into one of ``commands`` and run it. With
    ``default``, a command line that starts with an option (or is empty) runs that subcommand."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog=f"Without a command, {default!r} runs with the options given." if default else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for c in commands:
        c.arguments(sub.add_parser(c.name, help=c.help, description=c.help))
    argv = list(sys.argv[1:] if argv is None else argv)
    if default is not None and (not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))):
        argv.insert(0, default)
    args = parser.parse_args(argv)
    return next(c for c in commands if c.name == args.command).run(args)
