"""The database as commands find it: set up on first use."""

from __future__ import annotations

from typing import TextIO

from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor


def ensure_migrated(stream: TextIO) -> None:
    """Apply unapplied migrations (a new data directory, or an upgrade), saying so on `stream`.

    Commands such as `manage.py ocr` are often the first thing run in a new data directory; without
    this they would end in "no such table"."""
    connection = connections[DEFAULT_DB_ALIAS]
    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        stream.write(f"Setting up the database ({connection.settings_dict['NAME']}): applying migrations.\n")
        call_command("migrate", interactive=False, verbosity=0)
