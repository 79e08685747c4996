"""What every entry point shares: string-typed MLflow parameters, logging set up once, and one exit-code table.

Exit codes, the same for every entry point:

- 0: done;
- 2: bad input (a config key, a file, a parameter value, a model URI, an unreachable tracking server at start,
  a training whose loss became non-finite);
  the message names what is wrong and what is allowed; what can be checked first is checked before anything is
  changed, and what a later refusal keeps (export formats that passed the accuracy gate, a batch table whose every
  row failed) the message or the log names;
- 3: the work is done but the tracking server did not receive everything (the message names the journal to upload
  with ``python -m entrypoints.sync_tracking``);
- 1: anything unexpected (a traceback is logged).

A step that runs others (``main``'s children, the ranks of a multi-process training) exits with the code of the one
that failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from segmentation.exit_codes import record_exit_code
from segmentation.mlops.connection import TrackingIncompleteError
from segmentation.mlops.pipeline import StepFailedError

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_TRACKING_INCOMPLETE = 0, 1, 2, 3
BAD_INPUT = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, ConnectionError, FloatingPointError)


def str2bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) as MLflow's string parameters carry them."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def float_list(text: str) -> tuple[float, ...]:
    """``0.75,1.0,1.25`` -> ``(0.75, 1.0, 1.25)``."""
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.75,1.0,1.25, got {text!r}"
        ) from None


def run(name: str, step: Callable[[], int | None]) -> int:
    """Configure logging, call ``step`` and map what it raises to the exit codes above (recorded for a parent
    launcher, :mod:`segmentation.exit_codes`).

    ``step`` returns None (done) or an exit code of its own (a re-launched training's).
    """
    code = _run(name, step)
    record_exit_code(code)
    return code


def _run(name: str, step: Callable[[], int | None]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = step()
    except StepFailedError as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrackingIncompleteError as exc:
        print(f"{name}: tracking incomplete: {exc}", file=sys.stderr)
        return EXIT_TRACKING_INCOMPLETE
    except BAD_INPUT as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:
        logging.getLogger(name).exception("%s failed unexpectedly", name)
        return EXIT_UNEXPECTED
    return EXIT_OK if code is None else code
