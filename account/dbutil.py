"""Small database helpers shared by the commands and the migration."""

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
    """Write rows with PostgreSQL's COPY, or with bulk_create on other databases.

    Values go in as given: `auto_now` fields keep the value passed on both paths.
    """
    if is_postgresql(alias):
        return copy_rows(model, columns, rows, alias)
    objs = [model(**dict(zip(columns, row, strict=True))) for row in rows]
    auto_now = [f for f in model._meta.concrete_fields if getattr(f, "auto_now", False)]
    for f in auto_now:
        f.auto_now = False  # keep the given value, like COPY does
    try:
        model.objects.using(alias).bulk_create(objs, batch_size=batch_size)
    finally:
        for f in auto_now:
            f.auto_now = True
    return len(objs)


def reset_sequences(models, alias: str = "default") -> None:
    """After inserting explicit ids on PostgreSQL, move the id sequences past them."""
    from django.core.management.color import no_style

    connection = connections[alias]
    statements = connection.ops.sequence_reset_sql(no_style(), models)
    if statements:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
