"""`mlflow run . -e promote`: move a registry alias (production) to a version that scores at least as well."""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run, str2bool
from segmentation.mlops.registry import PRODUCTION
from segmentation.steps.promote import promote_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--version", default="", help="version to promote (evaluated first); empty with --rollback")
    parser.add_argument("--alias", default=PRODUCTION)
    parser.add_argument("--force", type=str2bool, default=False, help="promote even if it scores lower (recorded)")
    parser.add_argument("--rollback", type=str2bool, default=False, help="give the alias back to alias 'previous'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        outcome = promote_step(args.model_name, args.version, args.alias, args.force, args.rollback)
        verdict = "PROMOTED" if outcome.promoted else "not promoted"
        print(f"{args.model_name} version {outcome.version}: {verdict} ({outcome.alias}) - {outcome.reason}")
        for companion, aliases in outcome.companions.items():
            print(f"  {companion}: " + ", ".join(f"{alias} -> version {v}" for alias, v in sorted(aliases.items())))

    return run("promote", step)


if __name__ == "__main__":
    sys.exit(main())
