"""Deploy 1: log every write to the legacy user tables, for the sync (PostgreSQL).

Triggers on the legacy user table and its group and permission link tables append the id of
each user written to ChangeLog (side 'legacy'), in the writer's transaction; `copy_users`
then syncs the users the log names instead of comparing every user (`account.changecapture`
has the triggers and why they are plain SQL). The install logs a 'full' row: the first sync
after it compares every user. Nothing to do on SQLite, where the sync compares every user.
Reverse: the triggers are dropped and the legacy side of the log deleted.
"""

from django.db import migrations, models

from account import changecapture


def install(apps, schema_editor):
    changecapture.install(schema_editor.connection)


def uninstall(apps, schema_editor):
    changecapture.uninstall(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [
        ("account", "0004_natural_key_digests"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.AlterField(
            model_name="changelog",
            name="op",
            field=models.CharField(
                choices=[
                    ("insert", "insert"),
                    ("update", "update"),
                    ("delete", "delete"),
                    ("links", "group or permission links"),
                    ("full", "compare every user"),
                    ("pending", "rejected or in conflict at the last sync"),
                ],
                max_length=10,
            ),
        ),
        migrations.RunPython(install, uninstall),
    ]
