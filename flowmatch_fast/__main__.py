"""``python -m flowmatch_fast <command>``: the package's command line.

Subcommands live in :data:`SUBCOMMANDS`: name -> ``(module, help)``. Each module provides
``add_arguments(parser)``, ``main(args) -> int`` and, optionally, a ``DESCRIPTION`` string.
Modules are imported when the parser is built, so keep heavy optional dependencies (matplotlib,
tqdm, triton, ...) as imports inside the functions that use them.

To add a command: write a module with those functions and add one line to ``SUBCOMMANDS``.
(Benchmarks live in ``bench/``: ``make bench`` and ``bench/gpu_suite.sh``.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__

SUBCOMMANDS = {
    "demo": ("flowmatch_fast.demo",
             "train a tiny flow on a 2-D toy on CPU, sample, score, time vs. the original, plot"),
    "info": ("flowmatch_fast.info",
             "print versions, the CUDA extension, each backend's availability (for bug reports)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flowmatch_fast",
        description="flowmatch_fast: a drop-in, bitwise-faithful, fast flow-matching sampler.",
    )
    parser.add_argument("--version", action="version", version=f"flowmatch_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text,
                           description=getattr(module, "DESCRIPTION", help_text))
        module.add_arguments(p)
        p.set_defaults(_main=module.main, _parser=p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "_main", None) is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:  # reported with the subcommand's usage, not the top level's
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
