"""Rewrite the SyncState digests from group and permission ids to their natural keys.

Until this migration a digest held a user's links as group and permission ids; a restore into
a database whose groups and permissions have other ids (the backup stores them by natural key)
then changed every linked user's digest on both sides, so a legacy-only edit was reported as a
conflict. `Sync.digest` now takes the natural keys (`keys="natural"`); `keys="ids"` is the old
formula, kept for this migration.

For each side of each SyncState row, the recorded digest is replaced with the new formula's
digest of the row as it is now only where the old formula's digest of that row equals the
recorded one: a row unchanged since the last sync stays "unchanged", and a row changed since
(or recorded with NO_DIGEST, or deleted) keeps a digest that matches nothing, so it stays
"changed". The reverse does the opposite. One CREATE TABLE AS and one UPDATE per side, in SQL,
reading only the users with links (the two formulas give the others the same digest).
"""

from django.db import migrations, transaction

from account.usercopy import LINKS, CopyModels, Sync, link_table

TABLE = "digests_0004"  # a temporary table: (id, the digest recorded, the one replacing it)


def rewrite(apps, schema_editor, *, was: str, becomes: str):
    """Where a side's recorded digest equals the `was` formula's digest of its row now, record
    the `becomes` formula's digest of that row instead."""
    models = CopyModels.from_apps(apps)
    alias = schema_editor.connection.alias
    sync = Sync(models, alias, False, False, 0, None, None)
    pg, state_t = sync.postgresql, sync.table(models.state)
    schema = "pg_temp" if pg else "temp"
    sides = ((models.legacy, "l", "legacy_digest"), (models.new, "n", "new_digest"))
    with transaction.atomic(using=alias):
        sync.utc()
        for model, row, field in sides:
            column, table = sync.column(models.state, field), sync.table(model)
            # The two formulas differ only for users with links: the others are not read.
            linked = " UNION ".join(
                f"SELECT {sync.qn(user_col)} FROM {sync.table(through)}"
                for through, user_col, _ in (link_table(model, name) for name in LINKS)
            )
            selects = []
            for name, keys in (("was", was), ("now", becomes)):
                joins, digest = sync.digest(model, row, correlated=False, keys=keys)
                selects.append(
                    f"SELECT {row}.id, {digest} AS {name} FROM {table} {row} {joins} "
                    f"WHERE {row}.id IN ({linked})"
                )
            sync.sql(f"DROP TABLE IF EXISTS {schema}.{TABLE}")
            sync.sql(
                f"CREATE TEMP TABLE {TABLE} AS SELECT a.id, a.was, b.now "
                f"FROM ({selects[0]}) a JOIN ({selects[1]}) b ON b.id = a.id "
                # A row the two formulas give the same digest needs no write.
                f"WHERE a.was <> b.now AND a.id IN (SELECT user_id FROM {state_t})"
            )
            sync.sql(f"CREATE UNIQUE INDEX {TABLE}_id ON {TABLE} (id)")
            if pg:
                sync.sql(f"ANALYZE {TABLE}")
            # A row-value subquery, not UPDATE ... FROM: SQLite has the latter only since 3.33.
            sync.sql(
                f"UPDATE {state_t} SET {column} = "
                f"(SELECT d.now FROM {TABLE} d WHERE d.id = {state_t}.user_id) "
                f"WHERE EXISTS (SELECT 1 FROM {TABLE} d "
                f"WHERE d.id = {state_t}.user_id AND d.was = {state_t}.{column})"
            )
            sync.sql(f"DROP TABLE {schema}.{TABLE}")


def ids_to_natural_keys(apps, schema_editor):
    rewrite(apps, schema_editor, was="ids", becomes="natural")


def natural_keys_to_ids(apps, schema_editor):
    rewrite(apps, schema_editor, was="natural", becomes="ids")


class Migration(migrations.Migration):
    dependencies = [
        ("account", "0003_change_log"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(ids_to_natural_keys, natural_keys_to_ids)]
