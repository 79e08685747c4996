"""`mlflow run . -e promote`: move a registry alias (production) to a version that scores at least as well."""

from __future__ import annotations

import argparse
import logging
import sys

from entrypoints._cli import str2bool
from segmentation.eval_logging import run_promotion
from segmentation.registry import PRODUCTION, rollback


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--version", default="", help="version to promote (evaluated first); empty with --rollback")
    parser.add_argument("--alias", default=PRODUCTION)
    parser.add_argument("--force", type=str2bool, default=False, help="promote even if it scores lower (recorded)")
    parser.add_argument("--rollback", type=str2bool, default=False, help="give the alias back to alias 'previous'")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        if args.rollback:
            outcome = rollback(args.model_name, alias=args.alias)
        elif not args.version:
            raise ValueError("--version is required (or pass --rollback true)")
        else:
            outcome = run_promotion(args.model_name, args.version, alias=args.alias, force=args.force)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("promote").error("%s", exc)
        return 1
    print(f"{args.model_name} version {outcome.version}: {'PROMOTED' if outcome.promoted else 'not promoted'} "
          f"({outcome.alias}) - {outcome.reason}")
    for companion, aliases in outcome.companions.items():
        print(f"  {companion}: " + ", ".join(f"{alias} -> version {v}" for alias, v in sorted(aliases.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
