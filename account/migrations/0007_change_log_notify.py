"""Deploy 1: the change log tells the follower (`copy_users --follow`) when a writer commits.

A statement trigger on ChangeLog sends `NOTIFY account_changes` (PostgreSQL; nothing on
SQLite, where there is no change log and no follower). Reverse: the trigger is dropped.
"""

from django.db import migrations

from account import changecapture


def install(apps, schema_editor):
    changecapture.install_notify(schema_editor.connection)


def uninstall(apps, schema_editor):
    changecapture.uninstall_notify(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("account", "0006_capture_always_and_ddl_watch")]

    operations = [migrations.RunPython(install, uninstall)]
