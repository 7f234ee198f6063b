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
- the triggers installed (the writes before them were never logged);
- DDL that could have stopped a capture trigger for a while: a trigger on a user table
  disabled, enabled, dropped, created or renamed, a capture function replaced, any `ALTER
  TABLE` of a user table, on either side (`watch_ddl`: an event trigger, so a trigger disabled
  and enabled again in between two syncs, or inside one transaction, is still seen).

The row triggers fire `ALWAYS`: also in a session with `session_replication_role = replica`,
which skips ordinary triggers. The cut-over suspends the triggers on the user tables (the
legacy table is read-only then, and nothing reads its log until a rollback) and deletes the
legacy log; the rollback resumes them and logs a 'full' row.

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
USER_TABLES = (LEGACY_TABLE, *LINK_TABLES)
# NewUser's tables: their change log is the rollback's (`account.readonly`); DDL on them that
# could stop it logs a 'full' row on side 'new' (the rollback then compares every user).
NEW_TABLES = ("account_newuser", "account_newuser_groups", "account_newuser_user_permissions")
NEW_FUNCTIONS = ("account_newuser_change_log", "account_newuser_change_log_truncate")
CHANNEL = "account_changes"  # NOTIFY'd when a writer commits log rows (the follower LISTENs)
F_NOTIFY = "account_capture_notify"
F_DDL = "account_capture_ddl"  # the event trigger's function (and the event triggers' prefix)
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


def _create_triggers(cursor, tables) -> None:
    """(Re)create the capture triggers on `tables`, firing ALWAYS (replica sessions too)."""
    for name, table, definition in triggers():
        if table in tables:
            cursor.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            cursor.execute(f"CREATE TRIGGER {name} {definition}")
            cursor.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}")


def _log_full(cursor) -> None:
    cursor.execute(
        f"INSERT INTO {LOG_TABLE} (side, user_id, op, at) "
        f"VALUES ('legacy', {FULL_USER_ID}, 'full', now())"
    )


def install(connection) -> bool:
    """Create the functions and triggers (PostgreSQL only) and log a 'full' row: the writes
    made before the triggers are not in the log, so the next sync compares every user.
    Returns whether the DDL watch is installed too (`watch_ddl`)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        for name, body in FUNCTIONS.items():
            cursor.execute(
                f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
                f"AS $$ {body} $$"
            )
        _create_triggers(cursor, {table for _, table, _ in triggers()})
        _log_full(cursor)
    return watch_ddl(connection)


def uninstall(connection) -> None:
    """Drop the DDL watch, the triggers (with their functions) and the legacy side of the log."""
    if connection.vendor != "postgresql":
        return
    unwatch_ddl(connection)
    with connection.cursor() as cursor:
        for name in FUNCTIONS:
            cursor.execute(f"DROP FUNCTION IF EXISTS {name}() CASCADE")
        cursor.execute(f"DELETE FROM {LOG_TABLE} WHERE side = 'legacy'")


def suspend(connection) -> None:
    """The cut-over: drop the triggers on the legacy user tables (read-only from now on) and
    delete the legacy side of the log, which nothing reads until a rollback. The triggers on
    the auth and contenttypes tables and on SyncState stay (their 'full' rows are one per
    statement, and dropping them would lock tables every request reads)."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for name, table, _ in triggers():
            if table in USER_TABLES:
                cursor.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        cursor.execute(f"DELETE FROM {LOG_TABLE} WHERE side = 'legacy'")


def resume(connection) -> None:
    """The rollback: the legacy table is live again; capture its writes, and log a 'full' row
    (nothing was logged while it was read-only: the next sync compares every user)."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        if not missing(connection, USER_TABLES) or not all(
            _function_exists(cursor, name) for name in FUNCTIONS
        ):
            return  # never installed (before migration 0005), or not suspended
        _create_triggers(cursor, USER_TABLES)
        _log_full(cursor)


def _function_exists(cursor, name: str) -> bool:
    cursor.execute("SELECT to_regprocedure(%s) IS NOT NULL", [f"{name}()"])
    return cursor.fetchone()[0]


def install_notify(connection) -> None:
    """A statement trigger on the log: `NOTIFY` CHANNEL, delivered when the writer commits
    (PostgreSQL folds the notes of one transaction into one). Only a hint for the follower,
    which also looks at the log every few seconds."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE OR REPLACE FUNCTION {F_NOTIFY}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $$"
        )
        cursor.execute(f"DROP TRIGGER IF EXISTS {LOG_TABLE}_notify ON {LOG_TABLE}")
        cursor.execute(
            f"CREATE TRIGGER {LOG_TABLE}_notify AFTER INSERT ON {LOG_TABLE} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {F_NOTIFY}()"
        )
        cursor.execute(f"ALTER TABLE {LOG_TABLE} ENABLE ALWAYS TRIGGER {LOG_TABLE}_notify")


def notify_missing(connection) -> bool:
    """Whether the log's NOTIFY trigger is absent or not firing ALWAYS (PostgreSQL). Nothing is
    lost without it: the follower then carries logged writes at its heartbeat, not at once."""
    if connection.vendor != "postgresql":
        return False
    return bool(_not_firing(connection, [(f"{LOG_TABLE}_notify", LOG_TABLE)]))


def uninstall_notify(connection) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"DROP FUNCTION IF EXISTS {F_NOTIFY}() CASCADE")


def watch_ddl(connection) -> bool:
    """An event trigger (PostgreSQL) that logs a 'full' row for a side when a DDL command
    could have stopped its capture for a while (see the module's docstring). Only a
    superuser may create one: without the right, it is left out and this returns False
    (then run `copy_users --full` after touching the triggers by hand)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not cursor.fetchone()[0]:
            return False
        cursor.execute("SELECT current_schema()")
        schema = cursor.fetchone()[0]
        # Every table a legacy capture trigger is on (the user tables, the auth and
        # contenttypes tables for renames, SyncState), and NewUser's tables.
        legacy_tables = tuple(dict.fromkeys(table for _, table, _ in triggers()))
        names = {
            "legacy": (legacy_tables, tuple(FUNCTIONS)),
            "new": (NEW_TABLES, NEW_FUNCTIONS),
        }
        # A dropped trigger counts when it is one of the log's own (by name): dropping a
        # foreign key to a user table also drops PostgreSQL's internal triggers on it.
        log_triggers = [name for name, _, _ in triggers()] + [
            f"{table}_change_log{event}" for table in NEW_TABLES for event in ("", "_truncate")
        ]

        def literal(values) -> str:
            return "ARRAY[" + ", ".join(f"'{v}'" for v in values) + "]::text[]"

        def qualified(table) -> str:
            return connection.ops.quote_name(schema) + "." + connection.ops.quote_name(table)

        log = qualified(LOG_TABLE)
        side_of = " ".join(
            f"WHEN rel_schema = '{schema}' AND rel_name = ANY({literal(tables)}) "
            f"OR fn_name = ANY({literal(functions)}) THEN '{side}'"
            for side, (tables, functions) in names.items()
        )
        # Names, never OIDs baked in: a table rebuilt by a migration gets a new OID.
        cursor.execute(
            f"""CREATE OR REPLACE FUNCTION {F_DDL}() RETURNS event_trigger LANGUAGE plpgsql
            AS $$ DECLARE
                r record; rel oid; rel_schema text; rel_name text; fn_name text; side text;
            BEGIN
                -- A role that cannot see the schema cannot touch these tables either.
                IF NOT has_schema_privilege('{schema}', 'USAGE')
                   OR to_regclass('{log}') IS NULL THEN
                    RETURN;
                END IF;
                IF TG_EVENT = 'sql_drop' THEN
                    FOR r IN SELECT * FROM pg_event_trigger_dropped_objects()
                             WHERE object_type = 'trigger'
                             AND address_names[3] = ANY({literal(log_triggers)}) LOOP
                        rel_schema := r.address_names[1]; rel_name := r.address_names[2];
                        fn_name := NULL;
                        side := CASE {side_of} END;
                        IF side IS NOT NULL THEN
                            INSERT INTO {log} (side, user_id, op, at)
                            VALUES (side, {FULL_USER_ID}, 'full', now());
                        END IF;
                    END LOOP;
                    RETURN;
                END IF;
                FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
                    rel := CASE r.classid
                        WHEN 'pg_class'::regclass THEN r.objid
                        WHEN 'pg_trigger'::regclass THEN
                            (SELECT tgrelid FROM pg_trigger WHERE oid = r.objid) END;
                    SELECT n.nspname, c.relname INTO rel_schema, rel_name
                        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = rel;
                    fn_name := CASE WHEN r.classid = 'pg_proc'::regclass THEN
                        (SELECT proname FROM pg_proc WHERE oid = r.objid) END;
                    side := CASE {side_of} END;
                    IF side IS NOT NULL THEN
                        INSERT INTO {log} (side, user_id, op, at)
                        VALUES (side, {FULL_USER_ID}, 'full', now());
                    END IF;
                END LOOP;
            END $$"""
        )
        for event, on in (("", "ddl_command_end"), ("_drop", "sql_drop")):
            cursor.execute(f"DROP EVENT TRIGGER IF EXISTS {F_DDL}{event}")
            cursor.execute(
                f"CREATE EVENT TRIGGER {F_DDL}{event} ON {on} EXECUTE FUNCTION {F_DDL}()"
            )
            cursor.execute(f"ALTER EVENT TRIGGER {F_DDL}{event} ENABLE ALWAYS")
    return True


def unwatch_ddl(connection) -> None:
    """Drop the DDL watch. Only its owner (a superuser) may: another role leaves it, with a
    note (it does nothing once the change log table is gone)."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger e WHERE e.evtname LIKE %s AND NOT "
            "pg_has_role(current_user, e.evtowner, 'USAGE'))",
            [F_DDL + "%"],
        )
        if cursor.fetchone()[0]:
            print(
                f"\n  Note: the DDL watch ({F_DDL}) belongs to a superuser and is left in place; "
                f"a superuser can drop it: DROP EVENT TRIGGER {F_DDL}; "
                f"DROP EVENT TRIGGER {F_DDL}_drop."
            )
            return
        for event in ("", "_drop"):
            cursor.execute(f"DROP EVENT TRIGGER IF EXISTS {F_DDL}{event}")
        cursor.execute(f"DROP FUNCTION IF EXISTS {F_DDL}() CASCADE")


def missing(connection, tables=None) -> list[str]:
    """The capture triggers (on `tables`, default all) that are not there or do not fire
    ALWAYS (disabled, or firing only outside replica sessions; PostgreSQL); all on SQLite."""
    expected = [(n, t) for n, t, _ in triggers() if tables is None or t in tables]
    if connection.vendor != "postgresql":
        return [name for name, _ in expected]
    absent = _not_firing(connection, expected)
    return absent + (ddl_watch_missing(connection) if tables is None else [])


def _not_firing(connection, expected: list[tuple[str, str]]) -> list[str]:
    """The (trigger, table) pairs of `expected` that are not there or do not fire ALWAYS, by
    trigger name (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE t.tgname = ANY(%s) AND t.tgenabled = 'A' "
            "AND pg_catalog.pg_table_is_visible(c.oid)",
            [[name for name, _ in expected]],
        )
        found = set(cursor.fetchall())
    return [name for name, table in expected if (name, table) not in found]


def ddl_watch_missing(connection) -> list[str]:
    """The DDL watch's event triggers that are not there or not firing ALWAYS (commands on
    event triggers fire no event trigger, so this is how a disabled watch is seen). None are
    expected when this role could not have created them (not a superuser: `watch_ddl`)."""
    if connection.vendor != "postgresql":
        return []
    names = [F_DDL, F_DDL + "_drop"]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT evtname, evtenabled FROM pg_event_trigger WHERE evtname = ANY(%s)", [names]
        )
        found = dict(cursor.fetchall())
        if not found:
            cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            if not cursor.fetchone()[0]:
                return []
    return [name for name in names if found.get(name) != "A"]
