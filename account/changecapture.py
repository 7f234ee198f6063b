"""Change capture on the legacy user tables (PostgreSQL): the log the sync reads.

Migration 0005 installs row triggers on the legacy user table and its group and permission
link tables. In the writer's own transaction, each insert, update (one that changes a value)
and delete appends a row to `ChangeLog` with side 'legacy': the user's id and the kind of
write (insert, update, delete, links), ordered by the log's own id. The log is append-only:
the writer never reads it (a writer that skipped its row because one was already there
could lose its change to a sync deleting that row at the same moment).

What no row trigger sees, or what changes every digest at once, appends a 'full' row
instead (user id 0), and the next sync compares every user:
- TRUNCATE of the legacy table or a link table;
- a renamed group, permission or content type (the digests hold links by natural key);
- any write to SyncState that is not the sync's own (a rollback's ledger, a restore,
  migration 0004, the copy undone, a hand edit): the sync marks its transaction with
  `SYNC_SETTING`;
- the triggers installed (the writes before them were never logged).

`copy_users` reads the log in its snapshot, syncs exactly the users it names, and deletes
exactly the rows it read (`account.usercopy`). SQLite has no triggers here: the sync compares
every user there, as before.

Plain SQL, not django-pgtrigger: the link tables are Django's auto-created many-to-many
tables and the rename triggers sit on auth and contenttypes tables. pgtrigger declares a
trigger in the Meta of a model one owns, and puts the triggers of other apps' models in those
apps' migrations (`pgtrigger makemigrations`); these belong in deploy 1's own migration, with
its reverse. The read-only triggers and NewUser's change log (`account.readonly`) are
plain SQL too.
"""

LOG_TABLE = "account_changelog"
LEGACY_TABLE = "account_user"
LINK_TABLES = ("account_user_groups", "account_user_user_permissions")
STATE_TABLE = "account_syncstate"
# Tables whose renames change the natural keys in the digests, and the columns that count.
CATALOG = {
    "auth_group": ("name",),
    "auth_permission": ("codename", "content_type_id"),
    "django_content_type": ("app_label", "model"),
}
SYNC_SETTING = "account.sync_writes"  # set (locally) by the sync: its SyncState writes
FULL_USER_ID = 0  # the user id of a 'full' row

F_USER, F_LINK, F_FULL, F_STATE = (
    "account_capture_user",
    "account_capture_link",
    "account_capture_full",
    "account_capture_state",
)


def _append(user: str, op: str) -> str:
    return (
        f"INSERT INTO {LOG_TABLE} (side, user_id, op, at) VALUES ('legacy', {user}, {op}, now());"
    )


def triggers() -> list[tuple[str, str, str]]:
    """(name, table, CREATE TRIGGER statement) of every capture trigger."""
    out = [
        (
            f"{LEGACY_TABLE}_capture",
            LEGACY_TABLE,
            f"AFTER INSERT OR DELETE ON {LEGACY_TABLE} FOR EACH ROW EXECUTE FUNCTION {F_USER}()",
        ),
        (
            f"{LEGACY_TABLE}_capture_update",
            LEGACY_TABLE,
            f"AFTER UPDATE ON {LEGACY_TABLE} FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*) "
            f"EXECUTE FUNCTION {F_USER}()",
        ),
    ]
    for table in LINK_TABLES:
        out.append(
            (
                f"{table}_capture",
                table,
                f"AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW "
                f"EXECUTE FUNCTION {F_LINK}()",
            )
        )
    for table in (LEGACY_TABLE, *LINK_TABLES):
        out.append(
            (
                f"{table}_capture_truncate",
                table,
                f"AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {F_FULL}()",
            )
        )
    for table, columns in CATALOG.items():
        old = ", ".join(f"OLD.{c}" for c in columns)
        new = ", ".join(f"NEW.{c}" for c in columns)
        out.append(
            (
                f"{table}_capture_rename",
                table,
                f"AFTER UPDATE ON {table} FOR EACH ROW WHEN (ROW({old}) IS DISTINCT FROM "
                f"ROW({new})) EXECUTE FUNCTION {F_FULL}()",
            )
        )
    out.append(
        (
            f"{STATE_TABLE}_capture",
            STATE_TABLE,
            f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {STATE_TABLE} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {F_STATE}()",
        )
    )
    return out


FUNCTIONS = {
    F_USER: f"""BEGIN
        IF TG_OP = 'INSERT' THEN
            {_append("NEW.id", "'insert'")}
        ELSIF TG_OP = 'UPDATE' THEN
            {_append("NEW.id", "'update'")}
            IF OLD.id <> NEW.id THEN {_append("OLD.id", "'delete'")} END IF;
        ELSE
            {_append("OLD.id", "'delete'")}
        END IF;
        RETURN NULL;
    END""",
    F_LINK: f"""BEGIN
        IF TG_OP IN ('INSERT', 'UPDATE') THEN {_append("NEW.user_id", "'links'")} END IF;
        IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.user_id <> NEW.user_id) THEN
            {_append("OLD.user_id", "'links'")}
        END IF;
        RETURN NULL;
    END""",
    F_FULL: f"""BEGIN
        {_append(str(FULL_USER_ID), "'full'")}
        RETURN NULL;
    END""",
    F_STATE: f"""BEGIN
        IF coalesce(current_setting('{SYNC_SETTING}', true), '') <> 'on' THEN
            {_append(str(FULL_USER_ID), "'full'")}
        END IF;
        RETURN NULL;
    END""",
}


def install(connection) -> None:
    """Create the functions and triggers (PostgreSQL only) and log a 'full' row: the writes
    made before the triggers are not in the log, so the next sync compares every user."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for name, body in FUNCTIONS.items():
            cursor.execute(
                f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
                f"AS $$ {body} $$"
            )
        for name, table, definition in triggers():
            cursor.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            cursor.execute(f"CREATE TRIGGER {name} {definition}")
        cursor.execute(
            f"INSERT INTO {LOG_TABLE} (side, user_id, op, at) "
            f"VALUES ('legacy', {FULL_USER_ID}, 'full', now())"
        )


def uninstall(connection) -> None:
    """Drop the triggers (with their functions) and the legacy side of the log."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for name in FUNCTIONS:
            cursor.execute(f"DROP FUNCTION IF EXISTS {name}() CASCADE")
        cursor.execute(f"DELETE FROM {LOG_TABLE} WHERE side = 'legacy'")


def missing(connection) -> list[str]:
    """The capture triggers that are not there, or disabled (PostgreSQL); all on SQLite."""
    expected = [(name, table) for name, table, _ in triggers()]
    if connection.vendor != "postgresql":
        return [name for name, _ in expected]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE t.tgname = ANY(%s) AND t.tgenabled <> 'D' "
            "AND pg_catalog.pg_table_is_visible(c.oid)",
            [[name for name, _ in expected]],
        )
        found = set(cursor.fetchall())
    return [name for name, table in expected if (name, table) not in found]
