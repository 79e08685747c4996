"""Upload what a training left in its tracking journal (server down at the end, or a killed process).

    python -m entrypoints.sync_tracking outputs/<run_id>/tracking [--tracking-uri http://host:5000] [--timeout 600]

Sends the records in order (metrics keep their original steps and timestamps, checkpoints, images, the model and its
registered version, the final run status). Safe to run twice: delivered records are not sent again.
Exit codes: 0 everything delivered; 2 no journal there; 3 records still undelivered or rejected (see the message).
"""

from __future__ import annotations

import argparse
import logging
import sys


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="the journal folder <output_dir>/<run_id>/tracking (or <run_id> folder)")
    parser.add_argument("--tracking-uri", default=None, help="server to send to (default: the training's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to keep retrying")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from segmentation.tracking import sync_journal

    try:
        tracker = sync_journal(args.directory, args.tracking_uri, args.timeout)
    except FileNotFoundError as exc:
        print(f"sync_tracking failed: {exc}", file=sys.stderr)
        return 2
    journal = tracker.journal
    if journal.pending or journal.rejected:
        print(f"sync_tracking: run {tracker.run_id}: {journal.pending} record(s) still undelivered to "
              f"{tracker.tracking_uri} ({journal.last_error}), {journal.rejected} rejected (see "
              f"{journal.directory}/rejected.jsonl); run the command again when the server is up", file=sys.stderr)
        return 3
    print(f"run {tracker.run_id}: journal {journal.directory} fully delivered to {tracker.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
