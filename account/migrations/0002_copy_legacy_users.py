"""Copy every legacy user into NewUser + Profile (with groups, permissions, last_login).

The work is done by `account.usercopy`, shared with the `copy_users` and
`check_user_migration` commands; this migration passes it the historical models.
Policy: one legacy row the new schema cannot take stops the copy and nothing is written,
unless USER_COPY_SKIP_INVALID is on. Reverse: `migrate account 0001` removes what the copy
made, and refuses when anything on the new side differs from what the copy wrote.

Not atomic as a migration: the copy runs in a transaction of its own, so that when it fails,
the record of the failure (OperationLog) is written after the rollback and stays.
"""

import sys

from django.conf import settings
from django.db import migrations

from account.progress import progress
from account.usercopy import CopyModels, copy_users, uncopy_users


def copy_legacy_users(apps, schema_editor):
    """Copy legacy users that are not in NewUser yet."""
    bar = progress(None, "copy", unit="users")
    try:
        result = copy_users(
            CopyModels.from_apps(apps),
            alias=schema_editor.connection.alias,
            skip_invalid=settings.USER_COPY_SKIP_INVALID,
            report_dir=settings.REPORT_DIR,
            on_start=lambda total: setattr(bar, "total", total),
            on_progress=bar.update,
        )
    finally:
        bar.close()
    if result.pending:
        sys.stdout.write("\n" + "\n".join(f"  {line}" for line in result.lines()) + "\n")


def remove_copied_users(apps, schema_editor):
    """Delete what the copy made; refuse if the new side holds anything else."""
    uncopy_users(CopyModels.from_apps(apps), alias=schema_editor.connection.alias)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("account", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(copy_legacy_users, remove_copied_users)]
