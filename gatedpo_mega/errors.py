"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, arguments); the message names what and where."""

    exit_code = 2
    every_rank = False  # raised alike by every rank of a run (a collective decision): shown by rank 0 only


class ConfigError(UserError):
    """A configuration key or value is wrong."""

    every_rank = True  # every rank reads the same arguments and files: under a launcher, said once by rank 0


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the run stops and the message names the step."""

    exit_code = 3
    every_rank = False  # raised alike by every rank (a value reduced over all of them): shown by rank 0 only


def run_command(func: Callable[[Any], int], args: Any) -> int:
    """Run a command-line subcommand: a ``UserError`` becomes ``gatedpo: error: ...`` and its exit code."""
    try:
        return int(func(args))
    except UserError as e:
        if not e.every_rank or os.environ.get("RANK", "0") == "0":  # under a launcher: one line, from rank 0
            print(f"gatedpo: error: {e}", file=sys.stderr)
        return e.exit_code
    except (
        OSError
    ) as e:  # a path the system refuses (too long, no permission, a full disk): the user's to fix
        print(f"gatedpo: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gatedpo: interrupted", file=sys.stderr)
        return 130


def describe_os_error(e: OSError) -> str:
    """One line for an ``OSError``: what the system said and the file (cut to 200 characters)."""
    where = f": {str(e.filename)[:200]}" if e.filename is not None else ""
    return f"{e.strerror or e}{where}"
