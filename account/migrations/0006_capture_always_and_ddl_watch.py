"""Deploy 1: the change capture cannot be switched off unseen (PostgreSQL).

Migration 0005's triggers are created again, firing ALWAYS (a session with
`session_replication_role = replica` skips ordinary triggers, and its writes were not
logged), and an event trigger logs a 'full' row when DDL could have stopped a capture trigger
for a while (disabled and enabled again, dropped and created, a function replaced): the next
sync, or the rollback, then compares every user (`account.changecapture.watch_ddl`). An
event trigger needs a superuser: with another role it is left out, and this says so.
Reverse: the event trigger is dropped; the triggers stay as they are.
"""

from django.db import migrations

from account import changecapture, readonly


def install(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    watched = changecapture.install(connection)
    if readonly.is_read_only(apps.get_model("account", "User"), connection.alias):
        changecapture.suspend(connection)  # cut over already: its log stays off
    if not watched:
        print(
            "\n  Note: the DDL watch (an event trigger) needs a superuser and was left out: "
            "run `python manage.py copy_users --full` after disabling or changing a trigger "
            "on the user tables."
        )


def uninstall(apps, schema_editor):
    changecapture.unwatch_ddl(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("account", "0005_legacy_change_capture")]

    operations = [migrations.RunPython(install, uninstall)]
