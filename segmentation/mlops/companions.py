"""Companions: versions of other registered models made from a version of this one (the ONNX export registered as
``<name>-onnx``), marked by the tags ``source_model_name`` / ``source_model_version``.

Whenever ``production`` or ``previous`` moves on the source model (promotion, rollback), each companion model's alias
moves to its version made from the new holder, so ``models:/<name>-onnx@production`` serves the same network as
``models:/<name>@production`` (when the new holder was never exported, the companion keeps its alias and a warning
says so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mlflow import MlflowClient

from segmentation.mlops.registry import PREVIOUS, PRODUCTION, aliases_of, filter_literal

SOURCE_NAME_TAG = "source_model_name"  # on a companion version (the ONNX export): the model it was made from
SOURCE_VERSION_TAG = "source_model_version"

logger = logging.getLogger(__name__)


def link_companion(
    name: str, version: str | int, source_name: str, source_version: str | int, client: MlflowClient | None = None
) -> dict[str, str]:
    """Mark a version of ``name`` as made from ``source_name`` version ``source_version`` (e.g. its ONNX export).

    The version is tagged ``source_model_name`` / ``source_model_version`` and gets every alias the source
    version holds now, so exporting the ``production`` version makes its export the companion's ``production``.

    Returns:
        The aliases given to the version, ``{alias: version}``.
    """
    client = client or MlflowClient()
    version, source_version = str(version), str(source_version)
    client.set_model_version_tag(name, version, SOURCE_NAME_TAG, source_name)
    client.set_model_version_tag(name, version, SOURCE_VERSION_TAG, source_version)
    held = sorted(alias for alias, v in aliases_of(source_name, client).items() if v == source_version)
    for alias in held:
        client.set_registered_model_alias(name, alias, version)
    return dict.fromkeys(held, version)


def companion_versions(source_name: str, client: MlflowClient | None = None) -> dict[str, dict[str, str]]:
    """``{companion model: {source version: its newest version made from that source version}}``."""
    client = client or MlflowClient()
    found: dict[str, dict[str, str]] = {}
    for mv in client.search_model_versions(f"tags.`{SOURCE_NAME_TAG}` = {filter_literal(source_name)}"):
        made_from, source_version = found.setdefault(mv.name, {}), mv.tags.get(SOURCE_VERSION_TAG)
        if source_version and int(mv.version) > int(made_from.get(source_version, 0)):
            made_from[source_version] = str(mv.version)
    return found


def sync_companions(
    source_name: str, aliases: Sequence[str] = (PRODUCTION, PREVIOUS), client: MlflowClient | None = None
) -> dict[str, dict[str, str]]:
    """Give each companion model's ``aliases`` to its version made from the source version holding that alias.

    A companion with no version made from the new holder keeps its alias where it was (a warning names the
    version to export); removing it would break the next restart of a server that loads ``@production``.

    Returns:
        ``{companion model: {alias: version now holding it}}`` for the aliases that point at the right version.
    """
    client = client or MlflowClient()
    holders = aliases_of(source_name, client)
    synced: dict[str, dict[str, str]] = {}
    for companion, made_from in companion_versions(source_name, client).items():
        current = aliases_of(companion, client)
        for alias in dict.fromkeys(aliases):
            holder = holders.get(alias)
            if holder is None:
                continue
            target = made_from.get(holder)
            if target is None:
                logger.warning(
                    "%r has no version made from %r version %s, so its alias %r stays on version %s; "
                    "export that version to move it",
                    companion,
                    source_name,
                    holder,
                    alias,
                    current.get(alias),
                )
                continue
            if current.get(alias) != target:
                client.set_registered_model_alias(companion, alias, target)
            synced.setdefault(companion, {})[alias] = target
    return synced
