"""Triggers that guard the user tables around the cut-over.

- **Read-only.** The user table that is not live refuses the app's writes: the legacy table
  (and its group and permission links) after the cut-over, NewUser (and its links) after a
  rollback. The engine's own writes go through: the sync, the restore and the rollback mark
  their transaction with `engine_writes` (PostgreSQL: a transaction-local setting the
  trigger reads; SQLite: the triggers are dropped and created again inside the transaction,
  which holds the database's write lock). They stop an app, not an administrator.
- **The change log.** After the cut-over, NewUser and its links append the id of every user
  they insert, update or delete to `ChangeLog`, in the writer's own transaction; the rollback
  carries back exactly those users.
"""

from contextlib import contextmanager

from django.db import connections

from .models import ChangeLog

WRITER_SETTING = "account.engine_writes"  # PostgreSQL: set (locally) by the engine's writers


def links(model) -> list[tuple]:
    """(through model, user column, other column) of the model's group and permission links."""
    found = []
    for name in ("groups", "user_permissions"):
        m2m = model._meta.get_field(name)
        found.append((m2m.remote_field.through, m2m.m2m_column_name(), m2m.m2m_reverse_name()))
    return found


def link_tables(model) -> set[str]:
    """The model's own group and permission link tables (they stay with it)."""
    return {through._meta.db_table for through, _, _ in links(model)}


def trigger_name(table: str, event: str = "") -> str:
    return f"{table}_read_only{'_' + event if event else ''}"


def log_trigger_name(table: str, event: str = "") -> str:
    return f"{table}_change_log{'_' + event if event else ''}"


def _has_trigger(connection, table: str, name: str) -> bool:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = %s "
                "AND tgrelid = to_regclass(%s))",
                [name, connection.ops.quote_name(table)],
            )
        else:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = %s)",
                [name],
            )
        return bool(cursor.fetchone()[0])


def is_read_only(model, using: str = "default") -> bool:
    """Does `model`'s table carry its read-only trigger?"""
    connection = connections[using]
    table = model._meta.db_table
    event = "" if connection.vendor == "postgresql" else "insert"
    return _has_trigger(connection, table, trigger_name(table, event))


def is_logging(model, using: str = "default") -> bool:
    """Do `model`'s writes go to the change log? On PostgreSQL every log trigger of its table
    and links must be there and fire ALWAYS (not disabled, not skipped by replica sessions)."""
    connection = connections[using]
    table = model._meta.db_table
    if connection.vendor != "postgresql":
        return _has_trigger(connection, table, log_trigger_name(table, "insert"))
    watched = [table, *sorted(link_tables(model))]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COUNT(*) FROM pg_trigger WHERE tgenabled = 'A' AND "
            "(tgrelid, tgname) IN (SELECT to_regclass(t), n FROM unnest(%s::text[], %s::text[]) "
            "AS u (t, n))",
            [
                [connection.ops.quote_name(t) for t in watched for _ in range(2)],
                [log_trigger_name(t, e) for t in watched for e in ("", "truncate")],
            ],
        )
        return cursor.fetchone()[0] == 2 * len(watched)


@contextmanager
def engine_writes(using: str = "default"):
    """Let this transaction write to read-only user tables: the engine's own writes.

    Use it inside `transaction.atomic()`. PostgreSQL: a setting local to the transaction
    (it lasts until the transaction ends, so deferred triggers see it at commit). SQLite: the
    read-only triggers are dropped and created again on the way out; another connection cannot
    write in between (the transaction holds the database's write lock from its first write).
    """
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT set_config(%s, 'on', true)", [WRITER_SETTING])
            yield
            return
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE %s",
            ["%read_only%"],
        )
        triggers = [(n, sql) for n, sql in cursor.fetchall() if "_read_only_" in n]
        for name, _ in triggers:
            cursor.execute(f"DROP TRIGGER {connection.ops.quote_name(name)}")
    yield
    with connection.cursor() as cursor:
        for _, sql in triggers:
            cursor.execute(sql)


def make_read_only(model, using: str, message: str) -> None:
    """Triggers refuse every write to `model`'s table and its group and permission links,
    except the engine's (`engine_writes`).

    PostgreSQL: INSERT, UPDATE, DELETE and TRUNCATE, statement by statement, except for one
    case: deleting a group or permission on the live side takes these links with it (Django
    deletes the links first, then the group). A deferred trigger checks each deleted link at
    commit and refuses it unless its group or permission is gone by then.
    SQLite (no TRUNCATE, no deferred triggers): INSERT, UPDATE and DELETE on the table,
    INSERT and UPDATE on its links; deleting a link stays possible there.
    """
    connection = connections[using]
    qn = connection.ops.quote_name
    table = model._meta.db_table
    quoted = message.replace("'", "''")
    app_writes = f"coalesce(current_setting('{WRITER_SETTING}', true), '') <> 'on'"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            function = qn(trigger_name(table))
            cursor.execute(
                f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF {app_writes} THEN
                        RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
                            MESSAGE = '{quoted}';
                    END IF;
                    RETURN NULL;
                END $$"""
            )
            # TG_ARGV: the group (or permission) table and the link's column pointing at it.
            link_delete = qn(trigger_name(table, "link_delete"))
            cursor.execute(
                f"""CREATE OR REPLACE FUNCTION {link_delete}() RETURNS trigger LANGUAGE plpgsql
                AS $$ DECLARE still_there boolean; BEGIN
                    IF NOT ({app_writes}) THEN RETURN NULL; END IF;
                    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE id = $1)', TG_ARGV[0])
                        INTO still_there USING (to_jsonb(OLD) ->> TG_ARGV[1])::bigint;
                    IF still_there THEN
                        RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
                            MESSAGE = '{quoted}';
                    END IF;
                    RETURN NULL;
                END $$"""
            )
            cursor.execute(
                f"CREATE TRIGGER {qn(trigger_name(table))} BEFORE INSERT OR UPDATE OR DELETE "
                f"OR TRUNCATE ON {qn(table)} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            )
            for through, _user_column, other_column in links(model):
                t = through._meta.db_table
                other = next(
                    f.related_model
                    for f in through._meta.concrete_fields
                    if f.column == other_column
                )
                arguments = ", ".join(
                    "'" + v.replace("'", "''") + "'"
                    for v in (qn(other._meta.db_table), other_column)
                )
                cursor.execute(
                    f"CREATE TRIGGER {qn(trigger_name(t))} BEFORE INSERT OR UPDATE OR TRUNCATE "
                    f"ON {qn(t)} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
                )
                cursor.execute(
                    f"CREATE CONSTRAINT TRIGGER {qn(trigger_name(t, 'delete'))} AFTER DELETE "
                    f"ON {qn(t)} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "
                    f"{link_delete}({arguments})"
                )
            return
        for t in [table, *sorted(link_tables(model))]:
            for event in ("insert", "update", "delete") if t == table else ("insert", "update"):
                cursor.execute(
                    f"CREATE TRIGGER {qn(trigger_name(t, event))} BEFORE {event.upper()} "
                    f"ON {qn(t)} BEGIN SELECT RAISE(ABORT, '{quoted}'); END"
                )


def make_writable(model, using: str = "default") -> None:
    connection = connections[using]
    qn = connection.ops.quote_name
    table = model._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Dropping the functions drops the triggers that call them.
            for function in (trigger_name(table), trigger_name(table, "link_delete")):
                cursor.execute(f"DROP FUNCTION IF EXISTS {qn(function)}() CASCADE")
            return
        for t in [table, *sorted(link_tables(model))]:
            for event in ("insert", "update", "delete"):
                cursor.execute(f"DROP TRIGGER IF EXISTS {qn(trigger_name(t, event))}")


def start_change_log(model, using: str, side: str = ChangeLog.Side.NEW) -> None:
    """The first insert, update or delete of each user's row or links appends the user's id
    to ChangeLog (`side`), in the writer's transaction; later writes find it there (one row per
    user, so the log is bounded by the users, not the writes). TRUNCATE, which no row trigger sees, is
    refused (PostgreSQL) unless the engine writes (`engine_writes`)."""
    connection = connections[using]
    qn = connection.ops.quote_name
    table = model._meta.db_table
    log = qn(ChangeLog._meta.db_table)
    columns = "(side, user_id, op, at)"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            function = qn(log_trigger_name(table))
            # TG_ARGV[0]: the column holding the user's id (id, or a link's user column).
            cursor.execute(
                f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
                DECLARE
                    old_id bigint := (to_jsonb(OLD) ->> TG_ARGV[0])::bigint;
                    new_id bigint := (to_jsonb(NEW) ->> TG_ARGV[0])::bigint;
                    op text := CASE WHEN TG_ARGV[0] = 'id' THEN lower(TG_OP) ELSE 'links' END;
                BEGIN
                    IF TG_OP IN ('UPDATE', 'DELETE') AND new_id IS DISTINCT FROM old_id THEN
                        INSERT INTO {log} {columns} SELECT %s, old_id,
                            CASE WHEN op = 'links' THEN op ELSE 'delete' END, now()
                        WHERE NOT EXISTS (SELECT 1 FROM {log} WHERE side = %s AND user_id = old_id);
                    END IF;
                    IF TG_OP IN ('INSERT', 'UPDATE') THEN
                        INSERT INTO {log} {columns} SELECT %s, new_id, op, now()
                        WHERE NOT EXISTS (SELECT 1 FROM {log} WHERE side = %s AND user_id = new_id);
                    END IF;
                    RETURN NULL;
                END $$""".replace("%s", "'" + side + "'")
            )
            truncate = qn(log_trigger_name(table, "truncate"))
            message = (
                f"TRUNCATE of {table} is refused while its changes are logged for the rollback "
                "(the change log cannot see it): delete the rows instead."
            ).replace("'", "''")
            cursor.execute(
                f"""CREATE OR REPLACE FUNCTION {truncate}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF current_setting('session_replication_role') = 'replica' THEN
                        -- An administrator bypassing the app's rules: not refused, but the
                        -- rollback then compares every user.
                        INSERT INTO {log} {columns} VALUES ('{side}', 0, 'full', now());
                    ELSIF coalesce(current_setting('{WRITER_SETTING}', true), '') <> 'on' THEN
                        RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
                            MESSAGE = '{message}';
                    END IF;
                    RETURN NULL;
                END $$"""
            )
            watched = [(table, "id")] + [(t._meta.db_table, c) for t, c, _ in links(model)]
            for t, user_column in watched:
                cursor.execute(
                    f"CREATE TRIGGER {qn(log_trigger_name(t))} AFTER INSERT OR UPDATE OR DELETE "
                    f"ON {qn(t)} FOR EACH ROW EXECUTE FUNCTION {function}('{user_column}')"
                )
                cursor.execute(
                    f"CREATE TRIGGER {qn(log_trigger_name(t, 'truncate'))} BEFORE TRUNCATE "
                    f"ON {qn(t)} FOR EACH STATEMENT EXECUTE FUNCTION {truncate}()"
                )
                # ALWAYS: a session with session_replication_role = replica is logged too.
                for event in ("", "truncate"):
                    cursor.execute(
                        f"ALTER TABLE {qn(t)} ENABLE ALWAYS TRIGGER "
                        f"{qn(log_trigger_name(t, event))}"
                    )
            return
        now = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
        watched = [(table, "id", None)] + [
            (t._meta.db_table, c, "links") for t, c, _ in links(model)
        ]
        for t, user_column, op in watched:
            col = qn(user_column)
            for event, row, when, logged in (
                ("insert", "NEW", "", op or "insert"),
                ("update", "NEW", "", op or "update"),
                ("update_id", "OLD", f"WHEN OLD.{col} IS NOT NEW.{col} ", op or "delete"),
                ("delete", "OLD", "", op or "delete"),
            ):
                cursor.execute(
                    f"CREATE TRIGGER {qn(log_trigger_name(t, event))} "
                    f"AFTER {event.split('_')[0].upper()} ON {qn(t)} {when}BEGIN "
                    f"INSERT INTO {log} {columns} SELECT '{side}', {row}.{col}, '{logged}', {now} "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {log} WHERE side = '{side}' "
                    f"AND user_id = {row}.{col}); "
                    "END"
                )


def stop_change_log(model, using: str = "default") -> None:
    connection = connections[using]
    qn = connection.ops.quote_name
    table = model._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            for function in (log_trigger_name(table), log_trigger_name(table, "truncate")):
                cursor.execute(f"DROP FUNCTION IF EXISTS {qn(function)}() CASCADE")
            return
        for t in [table, *sorted(link_tables(model))]:
            for event in ("insert", "update", "update_id", "delete"):
                cursor.execute(f"DROP TRIGGER IF EXISTS {qn(log_trigger_name(t, event))}")
