"""What the command-line entry points share: flag types and the one-line error exit.

train.py, finetune.py, minillm.generate and minillm.predict end with `run_main(main, "name")`:
bad input (a ValueError), an unwritable folder or a full disk (an OSError) print one line naming
the problem and exit with code 2; Ctrl-C exits with 130. Checkpoints are written atomically, so
the last good one is intact in each case.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def run_main(main: Callable[[], int], prog: str) -> None:
    """Run a script's main(); turn expected failures into one line on stderr and an exit code."""
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an unwritable --out, a full disk: the previous checkpoint is intact
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)
