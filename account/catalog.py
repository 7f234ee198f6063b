"""Who points at a table: the one reader of the database catalog.

The sync (may a user deleted from the legacy table be deleted on the new side?), the restore
(would emptying a table cascade into rows the backup does not hold?), the cut-over and the
rollback (which foreign keys move, which views and generic references to name) all ask it.
Django's introspection sees only the tables on the `search_path`; these answers come from the
catalog itself, in every schema:

- `foreign_keys_to(table)`: PostgreSQL's `pg_constraint`, any schema, a partitioned table
  once (its parent's constraint, not the copies on its partitions); SQLite's
  `PRAGMA foreign_key_list` of every table.
- `views_on(table)`: views and materialized views that read the table, directly or through
  other views (`pg_depend` through `pg_rewrite`; SQLite: the views whose SQL names it).
- `generic_pairs()`: `(content type, object id)` column pairs, in any schema: a column named
  `content_type_id` or with a foreign key to the content type table, beside an `object_id`
  or `object_pk` column (`GenericForeignKey`'s default name, and django-guardian's).
"""

import re
from dataclasses import dataclass

from django.db import connections

# The referenced object's id beside a content type column.
GENERIC_ID_COLUMNS = ("object_id", "object_pk")
CONTENT_TYPE_TABLE = "django_content_type"
# pg_constraint.confdeltype -> the ON DELETE action.
ON_DELETE = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
SYSTEM_SCHEMAS = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'"
)


@dataclass(frozen=True)
class ForeignKey:
    """One foreign key constraint to a table, as the database catalog shows it."""

    table: str  # as SQL names it: quoted where needed, schema-qualified outside search_path
    columns: tuple[str, ...]
    ref_columns: tuple[str, ...]
    name: str = ""  # PostgreSQL's constraint name (SQLite's have none)
    definition: str = ""  # pg_get_constraintdef()
    validated: bool = True
    relname: str = ""  # the bare table name (for the new constraint's name)
    on_delete: str = "NO ACTION"
    partitioned: bool = False  # PostgreSQL: a partitioned table (no NOT VALID constraints)
    owned: bool = True  # the current role may alter the table

    def __str__(self):
        return f"{self.table}({', '.join(self.columns)})"


@dataclass(frozen=True)
class GenericPair:
    """A content type column and the object id column beside it, in one table."""

    table: str  # as SQL names it, like ForeignKey.table
    content_type: str
    object_id: str

    def __str__(self):
        return f"{self.table}({self.content_type}, {self.object_id})"


def sql_name(table: str, using: str = "default") -> str:
    """A table name from this module as it goes into SQL (PostgreSQL's are quoted already)."""
    connection = connections[using]
    return table if connection.vendor == "postgresql" else connection.ops.quote_name(table)


def foreign_keys_to(table: str, *, using: str = "default", exclude=()) -> list[ForeignKey]:
    """Every foreign key to `table` (a Django db_table), except those of tables in `exclude`."""
    connection = connections[using]
    qn = connection.ops.quote_name
    found = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                """SELECT c.conrelid::regclass::text, r.relname, c.conname,
                    pg_get_constraintdef(c.oid), c.convalidated, c.confdeltype, r.relkind = 'p',
                    pg_has_role(r.relowner, 'USAGE'),
                    ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                          ORDER BY k.i),
                    ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
                          ORDER BY k.i)
                FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
                WHERE c.contype = 'f' AND c.confrelid = to_regclass(%s) AND c.conparentid = 0
                AND c.conrelid <> ALL (ARRAY(SELECT to_regclass(t) FROM unnest(%s::text[]) t))
                ORDER BY 1, c.conname""",
                [qn(table), [qn(t) for t in sorted(exclude)]],
            )
            for row in cursor.fetchall():
                other, relname, name, definition, validated, action, partitioned, owned = row[:8]
                found.append(
                    ForeignKey(
                        table=other,
                        columns=tuple(row[8]),
                        ref_columns=tuple(row[9]),
                        name=name,
                        definition=definition,
                        validated=validated,
                        relname=relname,
                        on_delete=ON_DELETE.get(action, action),
                        partitioned=partitioned,
                        owned=owned,
                    )
                )
            return found
        for other in sorted(connection.introspection.table_names(cursor)):
            if other in exclude:
                continue
            cursor.execute(f"PRAGMA foreign_key_list({qn(other)})")
            parts: dict[int, list] = {}
            actions: dict[int, str] = {}
            for fk_id, seq, ref_table, col, ref_col, _on_update, on_delete, *_ in cursor.fetchall():
                if ref_table == table:
                    parts.setdefault(fk_id, []).append((seq, col, ref_col or "id"))
                    actions[fk_id] = on_delete
            for fk_id, cols in parts.items():
                cols.sort()
                found.append(
                    ForeignKey(
                        table=other,
                        columns=tuple(c for _, c, _ in cols),
                        ref_columns=tuple(r for *_, r in cols),
                        relname=other,
                        on_delete=actions[fk_id],
                    )
                )
    return found


def views_on(table: str, *, using: str = "default") -> list[str]:
    """The views (and materialized views) that read `table`, directly or through other views."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                """WITH RECURSIVE reads (oid) AS (
                    SELECT to_regclass(%s)::oid
                    UNION
                    SELECT w.ev_class FROM reads
                    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass
                        AND d.refobjid = reads.oid AND d.classid = 'pg_rewrite'::regclass
                    JOIN pg_rewrite w ON w.oid = d.objid AND w.ev_class <> reads.oid)
                SELECT c.oid::regclass::text FROM reads JOIN pg_class c ON c.oid = reads.oid
                WHERE c.relkind IN ('v', 'm') ORDER BY 1""",
                [connection.ops.quote_name(table)],
            )
            return [name for (name,) in cursor.fetchall()]
        cursor.execute("SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY name")
        views = dict(cursor.fetchall())
    found, names = [], {table}
    while True:  # views over views: until no new one reads a name found so far
        pattern = re.compile(
            r"(?<![\w$])[\"`\[]?(" + "|".join(map(re.escape, names)) + r")[\"`\]]?(?![\w$])", re.I
        )
        new = [v for v, sql in views.items() if v not in names and pattern.search(sql or "")]
        if not new:
            return sorted(found)
        found += new
        names.update(new)


def generic_pairs(*, using: str = "default", exclude=()) -> list[GenericPair]:
    """Every (content type, object id) column pair, in any schema, except tables in `exclude`."""
    connection = connections[using]
    pairs = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"""SELECT c.oid::regclass::text, ct.attname, oid_col.attname
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_attribute ct ON ct.attrelid = c.oid AND ct.attnum > 0
                    AND NOT ct.attisdropped
                JOIN pg_attribute oid_col ON oid_col.attrelid = c.oid AND oid_col.attnum > 0
                    AND NOT oid_col.attisdropped AND oid_col.attname = ANY(%s)
                WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {SYSTEM_SCHEMAS}
                AND (ct.attname = 'content_type_id' OR EXISTS (
                    SELECT 1 FROM pg_constraint k WHERE k.contype = 'f'
                    AND k.conrelid = c.oid AND k.conkey = ARRAY[ct.attnum]
                    AND k.confrelid = to_regclass(%s)))
                AND c.oid <> ALL (ARRAY(SELECT to_regclass(t) FROM unnest(%s::text[]) t))
                ORDER BY 1, 2, 3""",
                [
                    list(GENERIC_ID_COLUMNS),
                    CONTENT_TYPE_TABLE,
                    [connection.ops.quote_name(t) for t in sorted(exclude)],
                ],
            )
            return [GenericPair(*row) for row in cursor.fetchall()]
        for table in sorted(connection.introspection.table_names(cursor)):
            if table in exclude:
                continue
            names = {c.name for c in connection.introspection.get_table_description(cursor, table)}
            to_ct = {
                column
                for column, (_, target) in connection.introspection.get_relations(
                    cursor, table
                ).items()
                if target == CONTENT_TYPE_TABLE
            }
            if "content_type_id" in names:
                to_ct.add("content_type_id")
            for ct in sorted(to_ct):
                pairs += [GenericPair(table, ct, c) for c in GENERIC_ID_COLUMNS if c in names]
    return pairs


def content_type_id(model, *, using: str = "default") -> int | None:
    """The id of `model`'s content type, read in SQL (historical models too), or None."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if CONTENT_TYPE_TABLE not in connection.introspection.table_names(cursor):
            return None
        cursor.execute(
            f"SELECT id FROM {connection.ops.quote_name(CONTENT_TYPE_TABLE)} "
            "WHERE app_label = %s AND model = %s",
            [model._meta.app_label, model._meta.model_name],
        )
        row = cursor.fetchone()
        return row[0] if row else None


def match(fk: ForeignKey, target: str = "t", referencing: str = "r", qn=str) -> str:
    """SQL: the rows `referencing` (of fk.table) that point at the row `target` (of its table)."""
    return " AND ".join(
        f"{target}.{qn(ref)} = {referencing}.{qn(col)}"
        for col, ref in zip(fk.columns, fk.ref_columns, strict=True)
    )
