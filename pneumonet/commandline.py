"""What every door's parser shares: ``-v`` anywhere, ``KEY=VALUE`` overrides anywhere, examples in ``--help``.

Only argparse here, so building a parser (``--help``) imports nothing heavy.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

# A config override: a dotted key (at least one dot, e.g. train.epochs=3; or seed=1) and a value.
OVERRIDE = re.compile(r"^(seed|[A-Za-z_]\w*(\.[A-Za-z_]\w*)+)=")
OVERRIDES_HELP = "KEY=VALUE pairs may come anywhere after the subcommand, before or after the flags"


def verbose_parent() -> argparse.ArgumentParser:
    """A parent parser with ``-v``, so it is accepted after a subcommand too (``pneumonet train -v``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show every library's log lines on the console, debug logging, tracebacks")  # fmt: skip
    return parent


def examples(*lines: str) -> str:
    """An ``epilog`` listing example command lines (use with RawDescriptionHelpFormatter)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """``--config FILE`` and the ``KEY=VALUE`` overrides of a command."""
    parser.add_argument("--config", help="YAML config file (schema: pneumonet/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"config overrides, e.g. {example} ({OVERRIDES_HELP})")  # fmt: skip


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, positional: str | None = None) -> argparse.Namespace:
    """Parse ``argv``, gathering ``KEY=VALUE`` overrides wherever they stand.

    argparse takes a ``nargs="*"`` positional only once, so overrides after a flag are "unrecognized":
    they are collected here instead. ``positional`` names a list that shares the positionals with the
    overrides (``predict``'s images): items that look like overrides move from it to the overrides.
    """
    args, extra = parser.parse_known_args(argv)
    moved = [item for item in extra if OVERRIDE.match(item)]
    unknown = [item for item in extra if not OVERRIDE.match(item)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if positional and isinstance(getattr(args, positional, None), list):
        items = getattr(args, positional)
        moved = [item for item in items if OVERRIDE.match(item)] + moved
        setattr(args, positional, [item for item in items if not OVERRIDE.match(item)])
    if moved:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no KEY=VALUE overrides: {' '.join(moved)}")
        args.overrides = list(args.overrides or []) + moved
    return args
