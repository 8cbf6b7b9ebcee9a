"""The ``dualguide`` command: argument parsing and dispatch only; the work is in the library layer
(``dualguide.generation``) and the front ends' own packages (``jobs``, ``evaluation``, ``ui``).

One module per subcommand (``generate``, ``compare``, ``batch``, ``evaluate``, ``ui``, ``samplers``), each with
``add_parser(commands)`` and ``run(args) -> exit status``. Heavy modules (torch, diffusers) are imported only by
the subcommands that need them, so ``dualguide --help`` and ``dualguide samplers`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from ..generation.errors import UsageError, describe_error, one_line
from ..options import ArgumentParser
from . import batch, compare, evaluate, generate, samplers, ui

DEBUG_VARIABLE = "DUALGUIDE_DEBUG"  # =1: tracebacks and library warnings instead of one line
SUBCOMMANDS = {"generate": generate, "compare": compare, "batch": batch, "eval": evaluate, "ui": ui, "samplers": samplers}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds (partial files removed, lock freed) as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` while the command runs (only the main thread can set a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand with its options."""
    parser = ArgumentParser(
        prog="dualguide",
        description="Training-free dual guidance (TPG + NAG, with CFG and PAG) for SDXL in one UNet call per step.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for module in SUBCOMMANDS.values():
        module.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; every failure is one line on stderr and status 2 (usage) or 1 (runtime), 130 if interrupted
    (SIGINT), 143 if terminated (SIGTERM). Either signal leaves only whole files: a ``batch`` rerun finishes the job.

    Set ``DUALGUIDE_DEBUG=1`` to see the traceback of a runtime error and the libraries' warnings.
    """
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error, already printed as one line (2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    with warnings.catch_warnings(), _sigterm_unwinds():
        if not debug:
            warnings.simplefilter("ignore")  # libraries' deprecation notes would break the one-line rule
        try:
            return SUBCOMMANDS[args.command].run(args)
        except UsageError as error:
            print(f"dualguide: error: {one_line(str(error))}", file=sys.stderr)
            return 2
        except Terminated:
            print("dualguide: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("dualguide: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        except Exception as error:
            if debug:
                raise
            print(f"dualguide: error: {describe_error(error)}", file=sys.stderr)
            return 1
