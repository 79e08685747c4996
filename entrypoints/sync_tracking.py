"""Upload what a training left in its tracking journal (server down at the end, or a killed process).

    python -m entrypoints.sync_tracking outputs/<run_id>/tracking [--tracking-uri http://host:5000] [--timeout 600]

Sends the records in order (metrics keep their original steps and timestamps, checkpoints, images, the model and its
registered version, the final run status). Safe to run twice: delivered records are not sent again.
Damaged journal lines and records whose local files are gone are moved to ``quarantine.jsonl`` (with the reason)
and the rest is still delivered; records the server refuses go to ``rejected.jsonl``.
Exit codes (see ``entrypoints/_cli.py``): 0 everything delivered; 2 no journal there, or an unusable one (corrupt
``run.json`` or ``sent`` cursor); 3 records not delivered: still pending, quarantined or rejected (the message says
how many; the side files count until you move them away).
"""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run
from segmentation.steps.sync_tracking import sync_tracking_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="the journal folder <output_dir>/<run_id>/tracking (or <run_id> folder)")
    parser.add_argument("--tracking-uri", default=None, help="server to send to (default: the training's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to keep retrying")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        tracker = sync_tracking_step(args.directory, args.tracking_uri, args.timeout)
        print(f"run {tracker.run_id}: journal {tracker.journal.directory} fully delivered to {tracker.tracking_uri}")

    return run("sync_tracking", step)


if __name__ == "__main__":
    sys.exit(main())
