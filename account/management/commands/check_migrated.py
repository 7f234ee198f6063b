"""Refuse in one line while a migration is not applied (`make run` calls this before serving).

Serving never migrates: `migrate` would apply 0002, the user copy, without the pre-flight
check and the backup that `make migrate-data` runs first.
"""

from django.conf import settings
from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from account.management.base import OneLineErrorCommand


def unapplied_migrations(*, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """`app.name` of every migration not applied yet, in the order `migrate` would apply them."""
    executor = MigrationExecutor(connections[using])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]


class Command(OneLineErrorCommand):
    help = (
        "Exit 0 when every migration is applied; otherwise say in one line what to run first. "
        "Never migrates."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            choices=list(settings.DATABASES),
            help="Database alias (default: default).",
        )

    def handle(self, *args, database, verbosity, **options):
        pending = unapplied_migrations(using=database)
        if "account.0001_initial" in pending:
            raise CommandError(
                f"The database is not migrated ({len(pending)} migrations to apply): run "
                "`make migrate` for an empty app, or `make demo` for one with fake users, first."
            )
        if pending:
            shown = ", ".join(pending[:3]) + (", ..." if len(pending) > 3 else "")
            raise CommandError(
                f"{len(pending)} migration(s) not applied ({shown}): run `make migrate-data` "
                "first (pre-flight check, backup, then the copy)."
            )
        if verbosity > 0:
            self.stdout.write(self.style.SUCCESS("Every migration is applied."))
