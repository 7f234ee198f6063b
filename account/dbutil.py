"""Small database helpers shared by the commands and the migration."""

from contextlib import contextmanager
from itertools import islice

from django.db import connections


def is_postgresql(alias: str = "default") -> bool:
    return connections[alias].vendor == "postgresql"


def table_exists(model, alias: str = "default") -> bool:
    connection = connections[alias]
    with connection.cursor() as cursor:
        return model._meta.db_table in connection.introspection.table_names(cursor)


def copy_rows(model, columns, rows, alias: str = "default") -> int:
    """Write rows with PostgreSQL's COPY (psycopg 3); returns how many were written."""
    connection = connections[alias]
    qn = connection.ops.quote_name
    sql = "COPY {} ({}) FROM STDIN".format(
        qn(model._meta.db_table), ", ".join(qn(model._meta.get_field(c).column) for c in columns)
    )
    n = 0
    with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def insert_rows(model, columns, rows, alias: str = "default", batch_size: int = 2000) -> int:
    """Write rows (any iterable of tuples) with PostgreSQL's COPY, or bulk_create elsewhere.

    Values go in as given: `auto_now` fields keep the value passed on both paths. An iterator
    is streamed: one COPY on PostgreSQL, batches of `batch_size` objects elsewhere.
    """
    if is_postgresql(alias):
        return copy_rows(model, columns, rows, alias)
    auto_now = [f for f in model._meta.concrete_fields if getattr(f, "auto_now", False)]
    for f in auto_now:
        f.auto_now = False  # keep the given value, like COPY does
    n = 0
    try:
        rows = iter(rows)
        while batch := list(islice(rows, batch_size)):
            objs = [model(**dict(zip(columns, row, strict=True))) for row in batch]
            model.objects.using(alias).bulk_create(objs)
            n += len(objs)
    finally:
        for f in auto_now:
            f.auto_now = True
    return n


def reset_sequences(models, alias: str = "default") -> None:
    """After inserting explicit ids on PostgreSQL, move the id sequences past them."""
    from django.core.management.color import no_style

    connection = connections[alias]
    statements = connection.ops.sequence_reset_sql(no_style(), models)
    if statements:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)


@contextmanager
def indexes_built_after(models, alias: str = "default"):
    """On PostgreSQL, drop the tables' secondary indexes and constraints, rebuild them on exit.

    Loading a million rows into an empty table and building each index once afterwards (by
    sorting) is several times faster than updating every index row by row; `pg_restore`
    does the same. Unique and foreign key constraints are checked again when rebuilt, so a
    violation still fails the transaction. Use it inside `transaction.atomic()` and only on
    empty tables: other sessions wait on the table lock meanwhile. Elsewhere: does nothing.
    """
    connection = connections[alias]
    if connection.vendor != "postgresql":
        yield
        return
    qn = connection.ops.quote_name
    statements_after = []
    with connection.cursor() as cursor:
        # Run deferred foreign key checks now: ALTER TABLE refuses while any are pending.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        # Sort a million keys in memory when building the indexes (this transaction only).
        cursor.execute("SET LOCAL maintenance_work_mem = '256MB'")
        for model in models:
            table = model._meta.db_table
            cursor.execute(
                """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
                   WHERE conrelid = %s::regclass AND contype IN ('u', 'f') ORDER BY contype DESC""",
                [table],
            )
            for name, definition in cursor.fetchall():
                cursor.execute(f"ALTER TABLE {qn(table)} DROP CONSTRAINT {qn(name)}")
                statements_after.append(
                    f"ALTER TABLE {qn(table)} ADD CONSTRAINT {qn(name)} {definition}"
                )
            cursor.execute(
                """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
                   FROM pg_index i WHERE i.indrelid = %s::regclass AND NOT i.indisprimary
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)""",
                [table],
            )
            for name, definition in cursor.fetchall():
                cursor.execute(f"DROP INDEX {name}")
                statements_after.insert(0, definition)
    yield
    with connection.cursor() as cursor:
        # Indexes first, then unique constraints, then foreign keys (which need the former).
        for sql in sorted(statements_after, key=lambda s: "FOREIGN KEY" in s):
            cursor.execute(sql)
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")


def analyze(models, alias: str = "default") -> None:
    """Refresh PostgreSQL's planner statistics after a bulk load (else it may plan seq scans)."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for model in models:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")
