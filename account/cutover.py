"""Switch AUTH_USER_MODEL on a live database: the cut-over to NewUser, and the way back.

Deploy 1 runs with AUTH_USER_MODEL=account.User: the legacy table is live, the admin log and
the project's own tables hold foreign keys to it, and `copy_users` keeps NewUser a mirror.
Deploy 2 runs with AUTH_USER_MODEL=account.NewUser. Between the two, with the old app stopped,
`cutover()` moves the database across; `rollback()` moves it back. docs/cutover.md has the
whole procedure.

`cutover()`, run under AUTH_USER_MODEL=account.NewUser, in this order:

1. check     the setting and the state; finds every foreign key to the legacy user table in
             the database catalog (`account.catalog`: any schema, a partitioned table once),
             except the legacy model's own group and permission links, and refuses one whose
             columns are not a unique key of NewUser; names the views that read the legacy
             table and the generic references (`content_type_id` and `object_id` or
             `object_pk`, any schema) pointing at legacy users.
2. sync      `copy_users` carries the legacy side's changes into NewUser; refuses on conflicts,
             on a rejected change of a user already in NewUser (whatever the policy: that
             change would be lost), and, under the default policy, on any rejected row. Then
             refuses when any row of any table references a legacy user who is not in
             NewUser, naming table and count.
             The dry run stops here, after rehearsing the swap (step 4's second half) in a
             transaction it rolls back: it refuses whatever the swap would refuse.
3. backup    every account table, as `make migrate-data` takes it.
4. switch    one transaction: lock the legacy tables against writers, final sync, check the
             references again; then the swap: lock every table it touches at once (ACCESS
             EXCLUSIVE, readers wait too), re-point each foreign key to NewUser (PostgreSQL:
             the old constraint dropped, the new one added NOT VALID, or valid on a
             partitioned table; SQLite: the table rebuilt by Django's schema editor), move
             admin log entries to NewUser's content type, make the legacy tables read-only
             with triggers (`account.readonly`), start NewUser's change log, record the
             cut-over in OperationLog. Whatever the database refuses rolls it all back.
5. validate  PostgreSQL: VALIDATE each new constraint, each in its own transaction under
             `lock_timeout`; this scans the table without blocking its writers.

`rollback()`, run under AUTH_USER_MODEL=account.User:

1. check     the setting and the state; takes the users NewUser's change log names (what the
             new side wrote since the cut-over) and those whose NewUser row differed from
             the last sync's when the cut-over switched; compares each with its legacy row
             under the copy's rules and plans what to carry back: signups (with their ids),
             changed fields, group and permission links, deleted users. Values the legacy
             schema cannot hold, usernames the final legacy table would hold twice, are
             reported, and the default policy refuses. Refuses when NewUser is empty, or when
             it would delete more than 1% of the legacy users (at least 10, at most 1000)
             unless told to. The dry run then rehearses step 3 and rolls it back.
2. backup    as above.
3. switch    one transaction, NewUser writers blocked: plan again; lock every table the swap
             touches (ACCESS EXCLUSIVE); drop the triggers; carry it back (deletes first, then
             freed usernames moved aside, then inserts and updates); re-point the foreign keys
             the cut-over moved back to the legacy table, move admin log entries back, move
             the legacy id sequence past every id of both tables (never backwards), stop and
             empty the change log, make NewUser read-only (the sync is its one writer), tell
             the sync ledger the users it looked at are equal except for those left out,
             record it.
4. validate  as above, for the constraints moved back.

Each step leaves the database as it was before it, or done: a killed run is run again.
Run again after it is done, each changes nothing and says so.
"""

import csv
import math
import os
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from django.apps import apps
from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.core.management.base import CommandError
from django.db import DatabaseError, OperationalError, connections, transaction
from django.utils import timezone

from . import catalog, changecapture, readonly, usercopy
from .backup import BackupError, backup
from .catalog import ForeignKey
from .dbutil import table_exists
from .models import ChangeLog, NewUser, OperationLog, Profile, SyncState, User
from .normalize import Rejected, normalize_email, normalize_phone

MODELS = usercopy.CopyModels(
    legacy=User, new=NewUser, profile=Profile, state=SyncState, log=OperationLog, changes=ChangeLog
)
SETTING = {User: "account.User", NewUser: "account.NewUser"}
# The user columns the rollback compares and carries back: the ones the sync copies, but the id.
COLUMNS = tuple(f for f in usercopy.FIELDS if f != "id")
# The legacy columns with a unique key: the rollback moves their values out of the way first.
UNIQUE_COLUMNS = tuple(c for c in COLUMNS if User._meta.get_field(c).unique)
ADMIN_LOG = "django_admin_log"
CANDIDATES = "rollback_candidates"  # the temporary table of the ids the rollback looks at
LOCK_TIMEOUT_SQLSTATES = {"55P03", "57014"}  # lock_not_available; query_canceled (the timeout)

# The rollback deletes the legacy users whose NewUser rows are gone. More than this share of
# the legacy table (at least MASS_DELETE_FLOOR users, at most MASS_DELETE_CEILING) looks like
# an emptied NewUser rather than deletions, and needs --allow-mass-delete.
MASS_DELETE_SHARE = 0.01
MASS_DELETE_FLOOR = 10
MASS_DELETE_CEILING = 1000


class CutoverError(CommandError):
    """The cut-over or the rollback refused or failed; the message says what to do."""


class _Rehearsed(Exception):
    """Raised at the end of a dry run's swap, to roll it back."""


@contextmanager
def lock_wait_refused(message: str):
    """A statement that waited past lock_timeout (or statement_timeout) ends in CutoverError
    with `message`; any other database error passes through as it is."""
    try:
        yield
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) not in LOCK_TIMEOUT_SQLSTATES:
            raise
        raise CutoverError(message) from exc


# --- state ------------------------------------------------------------------------------------


def is_cut_over(alias: str = "default") -> bool:
    """True once the cut-over is done: the legacy table carries its read-only trigger."""
    return readonly.is_read_only(User, alias)


def last_cutover(alias: str = "default"):
    """The OperationLog row of the last successful cut-over or rollback, or None."""
    kinds = [OperationLog.Kind.CUTOVER, OperationLog.Kind.ROLLBACK]
    return OperationLog.objects.using(alias).filter(kind__in=kinds, ok=True).first()


def _rebase_sync_ledger(models, alias, exclude=(), only=""):
    """After the rollback the two sides are equal, except for the users it left out
    (`exclude`): tell the sync's ledger so; the next sync reports those as conflicts, so a
    second cut-over cannot bring back values the legacy table could not take. (Left-out
    signups have no legacy row and stay signups: the sync never touches them.)
    """
    usercopy.mark_in_sync(models, alias=alias, exclude=exclude, only=only)


# --- the catalog: foreign keys to a user table --------------------------------------------------


def _link_tables(model) -> set[str]:
    return readonly.link_tables(model)


def _foreign_keys_to(model, alias) -> list[ForeignKey]:
    """Every foreign key to `model`'s table in the catalog (any schema), except its own links."""
    return catalog.foreign_keys_to(
        model._meta.db_table, using=alias, exclude=readonly.link_tables(model)
    )


def _sql_table(fk: ForeignKey, connection) -> str:
    return catalog.sql_name(fk.table, connection.alias)


def _is_unique_key(model, columns, alias) -> bool:
    """Do `columns` form a unique key of `model`'s table, one a foreign key can reference?

    PostgreSQL accepts a primary key, a unique constraint or a unique index without a
    predicate or expressions, not deferrable, on exactly those columns (in any order).
    """
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return True  # SQLite: only Django's single-column keys move (`_django_field`)
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT EXISTS (SELECT 1 FROM pg_index i
                WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indimmediate
                AND i.indpred IS NULL AND i.indexprs IS NULL
                AND ARRAY(SELECT a.attname::text
                          FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) k(n)
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                          ORDER BY 1) = %s::text[])""",
            [connection.ops.quote_name(model._meta.db_table), sorted(columns)],
        )
        return bool(cursor.fetchone()[0])


def _not_valid_foreign_keys_to(model, alias) -> list[ForeignKey]:
    if connections[alias].vendor != "postgresql":
        return []
    return [fk for fk in _foreign_keys_to(model, alias) if not fk.validated]


def _django_field(fk: ForeignKey, target):
    """SQLite: the model field behind `fk`, which must point at `target` in this deploy."""
    for model in apps.get_models(include_auto_created=True):
        if model._meta.db_table == fk.table:
            for f in model._meta.concrete_fields:
                if (f.column,) == fk.columns and f.related_model is target:
                    return model, f
    raise CutoverError(
        f"SQLite cannot re-point {fk} to {target._meta.db_table} in place: it is not a foreign "
        f"key of a Django model to {SETTING[target]} (only those can be rebuilt here). Give "
        "that table a model, or run the cut-over on PostgreSQL."
    )


def _pointing_at(f, model):
    """A copy of field `f` (of its model) that points at `model`: the 'before' of alter_field."""
    name, _path, args, kwargs = f.deconstruct()
    kwargs["to"] = model
    clone = f.__class__(*args, **kwargs)
    clone.set_attributes_from_name(name)
    clone.model = f.model
    return clone


def _repoint(fk: ForeignKey, source, target, alias, editor, name: str = "") -> str:
    """Point `fk` at `target`'s table instead of `source`'s; returns the new constraint's name.

    PostgreSQL: the new constraint is added NOT VALID (no scan, a short lock) and the old one
    dropped; `validate` scans later. A partitioned table cannot take a NOT VALID foreign key:
    its constraint is added valid, which scans the table under the swap's lock. It is called `name`, by default the name Django gives
    such a foreign key (the rollback passes the original name). SQLite: Django's schema editor
    rebuilds the table.
    """
    connection = connections[alias]
    qn = connection.ops.quote_name
    src, dst = source._meta.db_table, target._meta.db_table
    if connection.vendor != "postgresql":
        model, new_field = _django_field(fk, target)
        editor.alter_field(model, _pointing_at(new_field, source), new_field)
        return ""
    reference = f"REFERENCES {src}("
    if fk.definition.count(reference) != 1:
        raise CutoverError(f"Unexpected definition of {fk.name} on {fk.table}: {fk.definition}")
    definition = fk.definition.replace(reference, f"REFERENCES {dst}(")
    # Django's own name for this foreign key (its schema editor's naming rule).
    name = name or editor._create_index_name(
        fk.relname, fk.columns, suffix=f"_fk_{dst}_{fk.ref_columns[0]}"
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {fk.table} DROP CONSTRAINT {qn(fk.name)}")
        not_valid = "" if fk.partitioned else " NOT VALID"
        cursor.execute(f"ALTER TABLE {fk.table} ADD CONSTRAINT {qn(name)} {definition}{not_valid}")
    return name


def _references_without(fk: ForeignKey, target, alias, same_person: str) -> int:
    """Rows of `fk.table` whose user will not be in `target`'s table as the same person.

    `same_person` is a condition on `t` (the target row) and `s` (the source row it mirrors).
    """
    connection = connections[alias]
    qn = connection.ops.quote_name
    source = User if target is NewUser else NewUser
    match = " AND ".join(
        f"t.{qn(ref)} = r.{qn(col)}" for col, ref in zip(fk.columns, fk.ref_columns, strict=True)
    )
    not_null = " AND ".join(f"r.{qn(col)} IS NOT NULL" for col in fk.columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT COUNT(*) FROM {_sql_table(fk, connection)} r WHERE {not_null} AND NOT EXISTS (
                SELECT 1 FROM {qn(target._meta.db_table)} t
                JOIN {qn(source._meta.db_table)} s ON s.id = t.id AND {same_person}
                WHERE {match})"""
        )
        return cursor.fetchone()[0]


def _unmirrored_ids(source, target, alias, same_person: str) -> list[int]:
    """Ids of `source` rows that have no row in `target` for the same person."""
    connection = connections[alias]
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT s.id FROM {qn(source._meta.db_table)} s WHERE NOT EXISTS (
                SELECT 1 FROM {qn(target._meta.db_table)} t WHERE s.id = t.id AND {same_person})
                ORDER BY s.id"""
        )
        return [row[0] for row in cursor.fetchall()]


def _orphans(fks, target, alias, missing, same_person) -> dict[str, int]:
    """Rows, per table, that reference a user who will not be in `target`."""
    found = {}
    for fk in fks:
        # A valid constraint guarantees a source row; when every source row is mirrored,
        # nothing can be orphaned and the table need not be scanned.
        if not missing and fk.validated:
            continue
        if n := _references_without(fk, target, alias, same_person):
            found[str(fk)] = found.get(str(fk), 0) + n
    return found


def _generic_references(model, alias) -> dict[str, int]:
    """Rows, per `table(content type, object id)` pair in any schema, whose content type is
    `model` (not the admin log's, which move)."""
    connection = connections[alias]
    qn = connection.ops.quote_name
    found = {}
    ct = catalog.content_type_id(model, using=alias)
    if ct is None:
        return found
    with connection.cursor() as cursor:
        for pair in catalog.generic_pairs(using=alias, exclude={ADMIN_LOG}):
            cursor.execute(
                f"SELECT COUNT(*) FROM {catalog.sql_name(pair.table, alias)} "
                f"WHERE {qn(pair.content_type)} = %s",
                [ct],
            )
            if n := cursor.fetchone()[0]:
                found[str(pair)] = n
    return found


def _has_admin_log(alias) -> bool:
    connection = connections[alias]
    with connection.cursor() as cursor:
        return ADMIN_LOG in connection.introspection.table_names(cursor)


def _move_admin_log(source, target, alias) -> int:
    """Admin log entries about `source` users now describe the same ids of `target`."""
    if not _has_admin_log(alias):
        return 0  # a project without django.contrib.admin
    cts = ContentType.objects.db_manager(alias)
    old = cts.get_for_model(source, for_concrete_model=False)
    new = cts.get_for_model(target, for_concrete_model=False)
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"UPDATE {ADMIN_LOG} SET content_type_id = %s WHERE content_type_id = %s",
            [new.pk, old.pk],
        )
        return cursor.rowcount


# --- the read-only triggers (account/readonly.py) ----------------------------------------------


def _read_only_message(at) -> str:
    table = User._meta.db_table
    return (
        f"{table} is read-only: the cut-over to account.NewUser ran at "
        f"{at:%Y-%m-%d %H:%M:%S %Z}. Write to {NewUser._meta.db_table} "
        "(AUTH_USER_MODEL=account.NewUser), or go back with `make cutover-rollback` "
        "(AUTH_USER_MODEL=account.User)."
    )


def _new_read_only_message(at) -> str:
    table = NewUser._meta.db_table
    return (
        f"{table} is read-only: the cut-over was rolled back at {at:%Y-%m-%d %H:%M:%S %Z} and "
        f"{User._meta.db_table} is the live user table (AUTH_USER_MODEL=account.User); "
        "`copy_users` keeps this one a mirror of it. Write to the legacy table, or cut over "
        "again (`make cutover`)."
    )


# --- the run: steps, timings, the switch transaction -----------------------------------------


@dataclass
class Outcome:
    """What a cut-over or rollback did (counts only, no personal data)."""

    kind: str
    dry_run: bool = False
    nothing_to_do: bool = False
    steps: dict = field(default_factory=dict)  # step -> seconds
    constraints: list = field(default_factory=list)  # {"table", "columns", "from", "to"}
    validated: list = field(default_factory=list)
    admin_log_entries: int = 0
    generic_references: dict = field(default_factory=dict)
    views: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    blocked_seconds: float = 0.0
    backup: str = ""
    report: Path | None = None
    left_behind_ids: list = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "constraints": self.constraints,
            "admin_log_entries": self.admin_log_entries,
            "generic_references": self.generic_references,
            "views": self.views,
            "counts": dict(sorted(self.counts.items())),
            "blocked_seconds": round(self.blocked_seconds, 2),
            "steps": {k: round(v, 2) for k, v in self.steps.items()},
            "backup": self.backup,
            # Legacy users NewUser does not hold (rejected by the copy): the rollback must
            # neither delete them nor take their ids for someone else.
            "left_behind_ids": self.left_behind_ids,
        }


class _Run:
    """Shared by the cut-over and the rollback: output, step timings, locks, validation."""

    kind = ""
    source = target = None  # the user model writes move away from, and the one they move to

    def __init__(self, *, alias, dry_run, skip_invalid, lock_timeout, say, allow_mass_delete):
        self.alias = alias
        self.connection = connections[alias]
        self.dry_run = dry_run
        self.skip_invalid = skip_invalid
        self.lock_timeout = lock_timeout
        self.allow_mass_delete = allow_mass_delete
        self.say = say or (lambda text, level=1: None)
        self.outcome = Outcome(kind=self.kind, dry_run=dry_run)
        self.started_at = timezone.now()

    @property
    def timeout_ms(self) -> str:
        """`lock_timeout` for PostgreSQL's settings: milliseconds, at least 1 (0 means none)."""
        return str(max(1, round(self.lock_timeout * 1000)))

    @contextmanager
    def step(self, name: str, what: str):
        self.say(f"{name}: {what}")
        started = time.perf_counter()
        yield
        self.outcome.steps[name] = seconds = time.perf_counter() - started
        self.say(f"{name}: done in {seconds:.1f} s")

    def check_setting(self):
        running = settings.AUTH_USER_MODEL
        if running != SETTING[self.target]:
            command = "cutover" if self.kind == "cutover" else "cutover_rollback"
            raise CutoverError(
                f"`{command}` runs with AUTH_USER_MODEL={SETTING[self.target]}; this process "
                f"has AUTH_USER_MODEL={running}. Set AUTH_USER_MODEL={SETTING[self.target]} "
                "(in the environment or .env) and run again."
            )
        if not (table_exists(User, self.alias) and table_exists(NewUser, self.alias)):
            raise CutoverError(
                "The account tables do not exist: run `python manage.py migrate` first."
            )

    def refuse_unmovable(self, fks):
        """A foreign key must reference a unique key of the table it moves to."""
        for fk in fks:
            if not _is_unique_key(self.target, fk.ref_columns, self.alias):
                raise CutoverError(
                    f"Cannot re-point {fk.name or fk} on {fk.table}: it references "
                    f"({', '.join(fk.ref_columns)}) of {self.source._meta.db_table}, which are "
                    f"not a unique key of {self.target._meta.db_table}. Make it reference the id "
                    "alone (or drop it), then run again. Nothing was changed."
                )

    def lock(self, models):
        """Keep writers off these tables until commit; readers go on (PostgreSQL)."""
        tables = [m._meta.db_table for m in models]
        for model in models:
            tables += sorted(_link_tables(model))
        qn = self.connection.ops.quote_name
        self.lock_tables([qn(t) for t in tables], "EXCLUSIVE")
        self.say(f"  locked {', '.join(tables)} against writers", 2)

    def lock_for_swap(self, fks):
        """Take every lock the swap needs at once, before changing any constraint.

        Dropping a foreign key takes ACCESS EXCLUSIVE on its table and on the user table it
        references; one ALTER after another, each waiting up to `lock_timeout` while holding
        the locks taken before, could keep readers out for tables x timeout. One LOCK TABLE
        under `lock_timeout` (and a statement timeout as long) waits once, or gives up.
        """
        qn = self.connection.ops.quote_name
        users = [User, NewUser]
        tables = [qn(m._meta.db_table) for m in users]
        tables += [qn(t) for t in sorted(_link_tables(User))]
        tables += [_sql_table(fk, self.connection) for fk in fks]
        if _has_admin_log(self.alias):
            tables.append(qn(ADMIN_LOG))
        tables = list(dict.fromkeys(tables))  # each once, in this order
        self.lock_tables(tables, "ACCESS EXCLUSIVE")
        self.say(f"  locked {', '.join(tables)} for the swap (readers wait too)", 2)

    def lock_tables(self, tables, mode):
        """LOCK TABLE in one statement, waiting at most `lock_timeout` in all (PostgreSQL).

        SQLite: nothing to do, the IMMEDIATE transaction holds the database's write lock.
        """
        if self.connection.vendor != "postgresql":
            return
        ms = self.timeout_ms
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('statement_timeout')")
            statement_timeout = cursor.fetchone()[0]
            # lock_timeout bounds each table's wait; statement_timeout the statement's.
            cursor.execute(
                "SELECT set_config('lock_timeout', %s, true), "
                "set_config('statement_timeout', %s, true)",
                [ms, ms],
            )
            with lock_wait_refused(
                f"Could not lock the tables within {self.lock_timeout:g} s: another session "
                "is using them (an app instance still running?). Stop it and run again; "
                "nothing was changed."
            ):
                cursor.execute(f"LOCK TABLE {', '.join(tables)} IN {mode} MODE")
            cursor.execute("SELECT set_config('statement_timeout', %s, true)", [statement_timeout])

    @contextmanager
    def switch_transaction(self):
        """One transaction; on SQLite inside Django's schema editor (it rebuilds tables).

        Whatever the database refuses in it ends in one line: the transaction is rolled back.
        """
        try:
            if self.connection.vendor == "postgresql":
                with transaction.atomic(using=self.alias):
                    yield self.connection.schema_editor(atomic=False)
            else:
                with self.connection.schema_editor(atomic=True) as editor:
                    yield editor
        except DatabaseError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CutoverError(
                f"The database refused the {self.kind} ({first}); it was rolled back, nothing "
                "was changed. Fix that and run again (--dry-run shows the plan)."
            ) from exc

    def repoint(self, fks, editor, names=None):
        """Re-point each foreign key to `target`; `names`: (table, columns) -> constraint name."""
        names = names or {}
        if self.connection.vendor == "postgresql":
            with self.connection.cursor() as cursor:
                # Check what the sync deferred now: ALTER TABLE refuses pending trigger events.
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        for fk in fks:
            name = names.get((fk.table, fk.columns), "")
            name = _repoint(fk, self.source, self.target, self.alias, editor, name)
            self.outcome.constraints.append(
                {"table": fk.table, "columns": list(fk.columns), "from": fk.name, "to": name}
            )
            self.say(f"  {fk} now references {self.target._meta.db_table}", 2)

    def validate(self):
        """Scan each NOT VALID constraint to `target`, one transaction each (PostgreSQL)."""
        for fk in _not_valid_foreign_keys_to(self.target, self.alias):
            qn = self.connection.ops.quote_name
            self.say(f"  validating {fk.name} on {fk.table}", 2)
            with (
                lock_wait_refused(
                    f"The {self.kind} itself is done, but validating {fk.name} on {fk.table} "
                    f"waited more than {self.lock_timeout:g} s for a lock. Run the same "
                    "command again to finish the validation."
                ),
                transaction.atomic(using=self.alias),
                self.connection.cursor() as cursor,
            ):
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", [self.timeout_ms])
                cursor.execute(f"ALTER TABLE {fk.table} VALIDATE CONSTRAINT {qn(fk.name)}")
            self.outcome.validated.append(fk.name)

    def finish_earlier_run(self) -> Outcome:
        """Done before: finish a validation a killed or timed-out run left, else nothing."""
        self.outcome.nothing_to_do = True
        pending = _not_valid_foreign_keys_to(self.target, self.alias)
        if pending and not self.dry_run:
            with self.step("validate", f"{len(pending)} constraints left by an earlier run"):
                self.validate()
            self.outcome.nothing_to_do = False
        return self.outcome

    def list_views_and_generic_references(self):
        """Name what reads or points at the source table and does not move with the swap."""
        source, target = self.source._meta.db_table, self.target._meta.db_table
        who = "legacy users" if self.source is User else "new users"
        # The user table and its group and permission links freeze together.
        frozen = [source, *sorted(readonly.link_tables(self.source))]
        self.outcome.views = []
        for table in frozen:
            for view in catalog.views_on(table, using=self.alias):
                if view in self.outcome.views:
                    continue
                self.outcome.views.append(view)
                self.say(
                    f"  note: the view {view} reads {table}, which is frozen after the switch: "
                    f"re-create it over {target}'s tables (docs/cutover.md, Views)"
                )
        self.outcome.generic_references = _generic_references(self.source, self.alias)
        for pair, n in self.outcome.generic_references.items():
            self.say(
                f"  note: {n} rows of {pair} point at {who} (generic references); they "
                "are not moved (decide for your app: docs/cutover.md)"
            )

    def check_backup_dir(self):
        """The dry run: would the backup step be able to write its file?"""
        directory = Path(settings.BACKUP_DIR)
        existing = next(p for p in (directory, *directory.parents) if p.exists())
        try:
            if existing == directory:
                with tempfile.TemporaryFile(dir=directory):
                    pass
            elif not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
                raise PermissionError(13, "Permission denied")  # it would be created here
        except OSError as exc:
            raise CutoverError(
                f"The backup step could not write into {directory} ({exc.strerror or exc}): set "
                "BACKUP_DIR to a writable directory. Nothing was changed."
            ) from exc

    def take_backup(self):
        try:
            outcome = backup(directory=settings.BACKUP_DIR)
        except BackupError as exc:
            raise CutoverError(
                f"The backup failed, so the {self.kind} stopped before its switch: {exc} "
                "(BACKUP_DIR sets where backups go)."
            ) from exc
        outcome.log(OperationLog.Kind.BACKUP, self.started_at)
        self.outcome.backup = str(outcome.path)
        self.say(f"  {outcome.line('backed up')}", 2)

    def record(self, message: str, ok: bool = True):
        OperationLog.objects.using(self.alias).create(
            kind=self.kind,
            ok=ok,
            started_at=self.started_at,
            summary=self.outcome.summary(),
            message=message,
        )

    def record_failure(self, exc):
        """A failed run leaves a row too, written outside the rolled-back transaction."""
        if self.dry_run:
            return
        # When the database itself is the problem, the message says so already.
        with suppress(DatabaseError):
            self.record(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, ok=False)


# --- the cut-over ------------------------------------------------------------------------------


class Cutover(_Run):
    """Move every reference from the legacy user table to NewUser (module docstring: steps)."""

    kind = OperationLog.Kind.CUTOVER
    source, target = User, NewUser
    # The same person on both sides: the copy keeps ids and the sync carries renames; a user
    # the copy made (a SyncState row) stays the same person when renamed on the new side.
    same_person = (
        f"(s.username = t.username OR EXISTS (SELECT 1 FROM "
        f"{SyncState._meta.db_table} ss WHERE ss.user_id = s.id))"
    )

    def run(self) -> Outcome:
        self.check_setting()
        if is_cut_over(self.alias):
            return self.finish_earlier_run()
        with self.step("check", "foreign keys to the legacy user table, views, generic references"):
            fks = self.check()
        with self.step("sync", "carry legacy changes into NewUser (copy_users)"):
            self.sync(fks, final=False)
        if self.dry_run:
            with self.step("rehearse", "the swap, in a transaction rolled back at its end"):
                self.rehearse()
            return self.outcome
        with self.step("backup", "every account table"):
            self.take_backup()
        blocked = time.perf_counter()
        with (
            self.step("switch", "lock, final sync, re-point, read-only trigger, record"),
            self.switch_transaction() as editor,
        ):
            self.lock([User])
            started = time.perf_counter()
            self.sync(fks, final=True)
            self.outcome.steps["final sync"] = time.perf_counter() - started
            started = time.perf_counter()
            self.swap(editor)
            self.outcome.steps["swap"] = time.perf_counter() - started
            self.outcome.blocked_seconds = time.perf_counter() - blocked
            self.record(self.message())
        self.outcome.blocked_seconds = time.perf_counter() - blocked
        with self.step("validate", "scan each new constraint (writers not blocked)"):
            self.validate()
        return self.outcome

    def swap(self, editor):
        """Re-point every foreign key, move the admin log, guard the legacy table, log NewUser."""
        # Read again under the lock: the catalog is what counts, not what the check saw.
        fks = _foreign_keys_to(User, self.alias)
        self.refuse_unmovable(fks)
        self.lock_for_swap(fks)
        self.repoint(fks, editor)
        self.outcome.admin_log_entries = _move_admin_log(User, NewUser, self.alias)
        self.say(f"  {self.outcome.admin_log_entries} admin log entries moved", 2)
        readonly.make_read_only(User, self.alias, _read_only_message(timezone.now()))
        changecapture.suspend(self.connection)  # nothing reads the legacy log until a rollback
        # NewUser is live now: writable (a rollback made it read-only), and its writes logged
        # from here on, for a rollback. The log starts empty: the 'full' rows these trigger
        # changes logged (`changecapture.watch_ddl`) are the engine's own, gone with it.
        readonly.make_writable(NewUser, self.alias)
        readonly.start_change_log(NewUser, self.alias)
        ChangeLog.objects.using(self.alias).filter(side=ChangeLog.Side.NEW).delete()

    def check(self) -> list[ForeignKey]:
        fks = _foreign_keys_to(User, self.alias)
        if self.connection.vendor != "postgresql":
            for fk in fks:
                _django_field(fk, NewUser)  # refuses tables SQLite cannot rebuild
        self.refuse_unmovable(fks)
        self.say(f"  {len(fks)} foreign keys to move: {', '.join(map(str, fks)) or 'none'}")
        for fk in fks:
            if fk.partitioned:
                self.say(
                    f"  note: {fk.table} is partitioned: its new constraint is added valid, "
                    "which scans the table while the swap holds its lock"
                )
        self.list_views_and_generic_references()
        return fks

    def rehearse(self):
        """The dry run does the switch itself, final sync (writing) and swap, then rolls it
        back: whatever the real run's switch would refuse (rejected rows, a lock, a
        constraint, a partitioned table, a missing table, the role's rights), the dry run
        refuses too. It takes the switch's locks, for as long as the switch."""
        self.check_backup_dir()
        outcome = replace(self.outcome, constraints=[])
        try:
            with self.switch_transaction() as editor:
                self.lock([User])
                self.sync(_foreign_keys_to(User, self.alias), final=True, dry_run=False)
                self.swap(editor)
                raise _Rehearsed
        except _Rehearsed:
            pass
        finally:
            self.outcome = replace(self.outcome, constraints=outcome.constraints)
        self.say("  the swap went through and was rolled back")

    def sync(self, fks, *, final: bool, dry_run: bool | None = None):
        """copy_users, then refuse on conflicts and on rows referencing unmirrored users.
        `dry_run`: None follows the run's own (the rehearsal writes, then rolls back)."""
        dry_run = self.dry_run if dry_run is None else dry_run
        try:
            result = usercopy.copy_users(
                MODELS,
                alias=self.alias,
                skip_invalid=self.skip_invalid,
                dry_run=dry_run,
                report_dir=settings.REPORT_DIR,
            )
        except usercopy.CopyError as exc:
            raise CutoverError(f"The sync refused; the cut-over changed nothing: {exc}") from exc
        for line in result.lines():
            self.say(f"  {line}", 2)
        if conflicts := result.conflicts:
            raise CutoverError(
                f"{conflicts} users changed on both sides since the last sync (listed in "
                f"{result.report}): resolve them, run `python manage.py copy_users`, then the "
                "cut-over again. Nothing was changed."
            )
        if result.live_rejected:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(result.live_rejected.items()))
            n = sum(result.live_rejected.values())
            ids = ", ".join(map(str, result.live_rejected_ids)) + (", ..." if n > 10 else "")
            raise CutoverError(
                f"{n} users already in NewUser have legacy changes the sync cannot carry "
                f"({reasons}; ids {ids}; each listed in {result.report}). The cut-over would "
                "drop them (a ban, a password, a deletion). Fix those legacy rows (or the rows "
                "that point at them), run `python manage.py copy_users`, then the cut-over "
                "again. Nothing was changed."
            )
        missing = _unmirrored_ids(User, NewUser, self.alias, self.same_person)
        copied = set(
            SyncState.objects.using(self.alias)
            .filter(user_id__in=missing)
            .values_list("user_id", flat=True)
        )
        if lost := [pk for pk in missing if pk in copied]:
            ids = ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else "")
            raise CutoverError(
                f"{len(lost)} users the copy made are gone from NewUser (deleted there since; "
                f"ids {ids}): the cut-over would leave them behind in the frozen legacy table. "
                "If they were deleted on purpose, delete them from the legacy table too; to "
                "copy them again, delete their rows from account_syncstate. Then run "
                "`python manage.py copy_users` and the cut-over again. Nothing was changed."
            )
        self.outcome.left_behind_ids = missing
        self.outcome.counts = Counter(
            legacy_users=User.objects.using(self.alias).count(),
            new_users=NewUser.objects.using(self.alias).count(),
            left_behind=len(missing),
        )
        orphans = _orphans(fks, NewUser, self.alias, missing, self.same_person)
        if not orphans:
            return
        where = ", ".join(f"{n} rows in {table}" for table, n in orphans.items())
        if dry_run and not result.rejected_total:
            self.say(f"  {where} reference legacy users the sync would copy now")
            return
        raise CutoverError(
            f"{where} reference legacy users who are not in NewUser (rejected by the copy, or "
            f"not copied yet; see {result.report or 'the last copy report'}). Fix those users "
            "so the sync copies them, or delete or re-assign those rows, then run again. "
            "Nothing was changed."
        )

    def message(self) -> str:
        o = self.outcome
        return (
            f"{len(o.constraints)} foreign keys re-pointed to {NewUser._meta.db_table}, "
            f"{o.admin_log_entries} admin log entries moved, {o.counts['new_users']} users in "
            f"NewUser ({o.counts['left_behind']} legacy users left behind); writers blocked "
            f"{o.blocked_seconds:.1f} s."
        )


# --- the way back ------------------------------------------------------------------------------


@dataclass
class CarryBack:
    """What the rollback writes into the legacy table."""

    signups: list = field(default_factory=list)  # (id, *COLUMNS)
    updates: list = field(default_factory=list)  # (*COLUMNS, id), the final legacy values
    deletes: list = field(default_factory=list)  # legacy ids deleted on the new side
    skipped: list = field(default_factory=list)  # NewUser ids not carried (reported)
    changed: Counter = field(default_factory=Counter)  # field -> users
    problems: list = field(default_factory=list)  # (id, reason, detail)
    live: list = field(default_factory=list)  # ids of problems of users the legacy table holds
    # column -> ids of updated users whose value of that unique column changes
    moved_values: dict = field(default_factory=dict)


@dataclass
class _Carried:
    """One NewUser row the rollback means to write into the legacy table."""

    exists: bool  # the legacy row is there (an update), else a signup
    values: dict  # column -> the final legacy value
    changed: list  # the columns that change


def _same_value(name, legacy_value, new_value) -> bool:
    """Does the NewUser value still say what the legacy value says, under the copy's rules?"""
    if legacy_value == new_value:
        return True
    rule = {"email": normalize_email, "phone_number": normalize_phone}.get(name)
    if rule is None or legacy_value is None:
        return False
    try:
        return rule(legacy_value)[0] == new_value
    except Rejected:
        return False


def _advance_sequence(model, alias, *past) -> None:
    """Move `model`'s id sequence past its own ids and those of the `past` models' tables,
    never backwards: an id handed out once (a user deleted since) is not handed out again.

    Django's `sequence_reset_sql` sets it to the highest id there now, which can be lower.
    """
    connection = connections[alias]
    qn = connection.ops.quote_name
    table = model._meta.db_table
    highest = ", ".join(
        f"(SELECT COALESCE(MAX(id), 0) FROM {qn(m._meta.db_table)})" for m in (model, *past)
    )
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [qn(table)])
            sequence = cursor.fetchone()[0]
            cursor.execute(
                f"SELECT setval(%s, GREATEST((SELECT last_value FROM {sequence}), {highest}))",
                [sequence],
            )
            return
        # SQLite (AUTOINCREMENT): the next id is past sqlite_sequence's value and every id.
        cursor.execute("SELECT COUNT(*) FROM sqlite_sequence WHERE name = %s", [table])
        if not cursor.fetchone()[0]:
            cursor.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (%s, 0)", [table])
        cursor.execute(
            f"UPDATE sqlite_sequence SET seq = MAX(seq, {highest}) WHERE name = %s", [table]
        )


class Rollback(_Run):
    """Carry NewUser's writes back into the legacy table and re-point the foreign keys back."""

    kind = OperationLog.Kind.ROLLBACK
    source, target = NewUser, User
    same_person = "1 = 1"  # by id: a user renamed on the new side is the same person

    def run(self) -> Outcome:
        self.check_setting()
        if not is_cut_over(self.alias):
            return self.finish_earlier_run()
        cutover_log = (
            OperationLog.objects.using(self.alias)
            .filter(kind=OperationLog.Kind.CUTOVER, ok=True)
            .first()
        )
        if cutover_log is None:
            raise CutoverError(
                "The legacy table is read-only but OperationLog has no record of the cut-over, "
                "so the rollback cannot tell which foreign keys it moved. Nothing was changed."
            )
        self.left_behind = set(cutover_log.summary.get("left_behind_ids", []))
        self.cutover_backup = cutover_log.summary.get("backup", "")
        # (table, columns) -> the constraint's name before the cut-over, restored on the way back.
        moved = {
            (c["table"], tuple(c["columns"])): c["from"] for c in cutover_log.summary["constraints"]
        }
        with self.step("check", self.choose_compare()):
            fks = self.moved_back(moved)
            self.say(
                f"  {len(fks)} foreign keys to move back: {', '.join(map(str, fks)) or 'none'}"
            )
            self.list_views_and_generic_references()
            self.differed = [] if self.full_compare else self.differed_at_the_cutover()
            self.report(self.plan())
        if self.dry_run:
            with self.step("rehearse", "the switch back, in a transaction rolled back at its end"):
                self.check_backup_dir()
                try:
                    with self.switch_transaction() as editor:
                        self.lock([NewUser, User])
                        self.recheck_compare()
                        self.switch_back(self.plan(), moved, editor)
                        raise _Rehearsed
                except _Rehearsed:
                    pass
                self.outcome.constraints = []
                self.say("  the switch back went through and was rolled back")
            return self.outcome
        with self.step("backup", "every account table"):
            self.take_backup()
        blocked = time.perf_counter()
        with (
            self.step("switch", "lock, carry back, re-point, swap the triggers, record"),
            self.switch_transaction() as editor,
        ):
            self.lock([NewUser, User])
            self.recheck_compare()
            plan = self.plan()
            self.outcome.counts = Counter()
            self.report(plan)
            self.switch_back(plan, moved, editor)
            self.outcome.blocked_seconds = time.perf_counter() - blocked
            self.record(self.message())
        self.outcome.blocked_seconds = time.perf_counter() - blocked
        with self.step("validate", "scan each constraint moved back (writers not blocked)"):
            self.validate()
        return self.outcome

    def choose_compare(self) -> str:
        """Trust the change log, or compare every user: when a cut-over made by an earlier
        version logged nothing, a log trigger is missing, disabled or replica-only, the DDL
        watch is off, or DDL on NewUser's tables could have stopped the log for a while (a
        'full' row, `changecapture.watch_ddl`). Decided at the check, and again under the
        switch's lock (a gap opened in between, during the backup say, counts too)."""
        logging = readonly.is_logging(NewUser, self.alias)
        watch = changecapture.ddl_watch_missing(self.connection)
        gap = (
            ChangeLog.objects.using(self.alias)
            .filter(side=ChangeLog.Side.NEW, op=ChangeLog.Op.FULL)
            .exists()
        )
        self.full_compare = not logging or bool(watch) or gap
        if not self.full_compare:
            return "the users NewUser's writes touched since the cut-over"
        if not logging:
            return "every user is compared (this cut-over kept no change log)"
        return (
            "every user is compared (the change log's triggers were changed since the "
            "cut-over, so it may have missed writes)"
        )

    def recheck_compare(self):
        """Under the lock: if the log can no longer be trusted, compare every user now."""
        if not self.full_compare:
            what = self.choose_compare()
            if self.full_compare:
                self.say(f"  under the lock: {what}")

    def switch_back(self, plan: "CarryBack", moved, editor):
        """Carry the plan back, re-point, make NewUser read-only (its writes are no longer
        logged: nothing reads them until the next cut-over), tell the sync's ledger."""
        fks = self.moved_back(moved)  # the catalog under the lock is what counts
        self.lock_for_swap(fks)
        readonly.make_writable(User, self.alias)
        self.carry_back(plan)
        missing = sorted(set(plan.skipped) - self.existing_legacy_ids(plan.skipped))
        orphans = _orphans(fks, User, self.alias, missing, self.same_person)
        if orphans:
            where = ", ".join(f"{n} rows in {t}" for t, n in orphans.items())
            raise CutoverError(
                f"{where} reference new users the rollback cannot carry back (listed in "
                f"{self.outcome.report}). Fix or delete them, then run again. Nothing "
                "was changed."
            )
        self.repoint(fks, editor, names=moved)
        self.outcome.admin_log_entries = _move_admin_log(NewUser, User, self.alias)
        readonly.stop_change_log(NewUser, self.alias)
        readonly.make_read_only(NewUser, self.alias, _new_read_only_message(timezone.now()))
        ChangeLog.objects.using(self.alias).filter(side=ChangeLog.Side.NEW).delete()
        changecapture.resume(self.connection)  # the legacy table's writes are logged again
        # The users left out differ on the two sides: the next sync reports them.
        with readonly.engine_writes(self.alias):
            _rebase_sync_ledger(MODELS, self.alias, exclude=plan.skipped, only=CANDIDATES)

    def differed_at_the_cutover(self) -> list[int]:
        """NewUser rows that were not what the last sync wrote when the cut-over switched: a
        write to NewUser before it (kept by the sync), or a user made there (no sync state).

        Their NewUser values were live after the switch, as those of the users the change log
        names. A row changed since the cut-over is in the change log too; one that is not in it
        is as it was at the switch, so this holds whenever it is read (it is read once, before
        the lock)."""
        sync = usercopy.Sync(MODELS, self.alias, False, False, 0, None, None)
        joins, digest = sync.digest(NewUser, "n", correlated=False)
        qn = self.connection.ops.quote_name
        with transaction.atomic(using=self.alias):
            sync.utc()
            rows = sync.sql(
                f"SELECT n.id FROM {qn(NewUser._meta.db_table)} n {joins} "
                f"LEFT JOIN {qn(SyncState._meta.db_table)} s ON s.user_id = n.id "
                f"WHERE s.user_id IS NULL OR {digest} <> s.new_digest ORDER BY n.id"
            )
        return [pk for (pk,) in rows]

    def candidates(self) -> str:
        """A temporary table of the ids the rollback looks at: the change log's, and the users
        that differed at the cut-over (or, without a change log, every user on either side).
        Returns its name."""
        qn = self.connection.ops.quote_name
        with self.connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {CANDIDATES}")
            cursor.execute(f"CREATE TEMPORARY TABLE {CANDIDATES} (id bigint PRIMARY KEY)")
            if self.full_compare:
                cursor.execute(
                    f"INSERT INTO {CANDIDATES} (id) SELECT id FROM {qn(NewUser._meta.db_table)} "
                    f"UNION SELECT id FROM {qn(User._meta.db_table)}"
                )
                return CANDIDATES
            cursor.execute(
                f"INSERT INTO {CANDIDATES} (id) SELECT DISTINCT user_id "
                f"FROM {qn(ChangeLog._meta.db_table)} WHERE side = %s",
                [ChangeLog.Side.NEW],
            )
            cursor.executemany(
                f"INSERT INTO {CANDIDATES} (id) VALUES (%s) ON CONFLICT DO NOTHING",
                [(pk,) for pk in self.differed],
            )
        return CANDIDATES

    def moved_back(self, moved) -> list[ForeignKey]:
        """The foreign keys to NewUser that the cut-over moved (the others belong to NewUser)."""
        fks = [f for f in _foreign_keys_to(NewUser, self.alias) if (f.table, f.columns) in moved]
        if self.connection.vendor != "postgresql":
            for fk in fks:
                _django_field(fk, User)  # refuses tables SQLite cannot rebuild
        self.refuse_unmovable(fks)
        return fks

    def plan(self) -> CarryBack:
        """Compare every NewUser row with its legacy row; decide what goes back.

        A row goes back unless the legacy schema cannot hold it (`problem`) or its unique
        values would clash with another row of the legacy table as the rollback leaves it
        (`clashes`); those are reported and skipped.
        """
        plan = CarryBack()
        carried: dict[int, _Carried] = {}
        qn = self.connection.ops.quote_name
        new_cols = ", ".join(f"n.{qn(c)}" for c in COLUMNS)
        old_cols = ", ".join(f"l.{qn(c)}" for c in COLUMNS)
        limits = {c: User._meta.get_field(c).max_length for c in COLUMNS}
        legacy_t, new_t = qn(User._meta.db_table), qn(NewUser._meta.db_table)
        n = len(COLUMNS)
        candidates = self.candidates()
        gone = []  # legacy users whose NewUser row is gone: deleted on the new side
        with self.connection.chunked_cursor() as cursor:
            cursor.execute(
                f"SELECT c.id, n.id, l.id, {new_cols}, {old_cols} FROM {candidates} c "
                f"LEFT JOIN {new_t} n ON n.id = c.id "
                f"LEFT JOIN {legacy_t} l ON l.id = c.id ORDER BY c.id"
            )
            while rows := cursor.fetchmany(usercopy.BATCH):
                for row in rows:
                    pk, in_new, in_legacy = row[0], row[1], row[2]
                    new, old = row[3 : 3 + n], row[3 + n :]
                    if in_new is None:
                        if in_legacy is not None:
                            gone.append(pk)
                        continue
                    final, changed = list(new), list(COLUMNS)
                    if in_legacy is not None:
                        # Unchanged values keep their legacy form ('9841234567', not E.164).
                        final, changed = [], []
                        for name, old_value, new_value in zip(COLUMNS, old, new, strict=True):
                            same = _same_value(name, old_value, new_value)
                            final.append(old_value if same else new_value)
                            if not same:
                                changed.append(name)
                        if not changed:
                            continue
                    values = dict(zip(COLUMNS, final, strict=True))
                    if problem := self.problem(pk, values, limits):
                        plan.problems.append((pk, *problem))
                        plan.skipped.append(pk)
                        if in_legacy is not None:
                            plan.live.append(pk)
                    else:
                        carried[pk] = _Carried(in_legacy is not None, values, changed)
        # Legacy users gone from NewUser: deleted on the new side, unless left behind.
        plan.deletes = [pk for pk in gone if pk not in self.left_behind]
        # A user left out keeps its legacy values, which may clash in turn: until none does.
        while clashes := self.clashes(carried, plan.deletes):
            for pk, problem in sorted(clashes.items()):
                plan.problems.append((pk, *problem))
                plan.skipped.append(pk)
                if carried.pop(pk).exists:
                    plan.live.append(pk)
        for pk, row in carried.items():
            final = [row.values[c] for c in COLUMNS]
            if not row.exists:
                plan.signups.append((pk, *final))
                continue
            plan.updates.append((*final, pk))
            plan.changed.update(row.changed)
            for column in UNIQUE_COLUMNS:
                if column in row.changed:
                    plan.moved_values.setdefault(column, []).append(pk)
        plan.skipped.sort()
        return plan

    def problem(self, pk, values, limits) -> tuple[str, str] | None:
        """Why the legacy schema cannot hold this NewUser row, or None."""
        if pk in self.left_behind:
            return "id_taken", f"id {pk} belongs to a legacy user the cut-over left behind"
        for name, limit in limits.items():
            value = values[name]
            if limit and value is not None and len(value) > limit:
                return (
                    f"{name}_too_long",
                    f"{name} has {len(value)} characters (legacy max {limit})",
                )
        return None

    def clashes(self, carried: dict, deletes) -> dict[int, tuple[str, str]]:
        """Carried users whose unique values another row holds in the final legacy table.

        The final table: legacy rows not deleted and not carried keep their values; carried
        rows take theirs. Values carried rows give up are free (they are moved out of the way
        before any is written), so renames, reuse of a freed name and swaps all fit.
        """
        found = {}
        vacated = set(deletes) | {pk for pk, row in carried.items() if row.exists}
        for column in UNIQUE_COLUMNS:
            wanted: dict = {}
            for pk, row in carried.items():
                if row.values[column] is not None:
                    wanted.setdefault(row.values[column], []).append(pk)
            holders = self.legacy_holders(column, list(wanted))
            for value, pks in wanted.items():
                if len(pks) > 1:
                    for pk in pks:
                        others = ", ".join(str(o) for o in pks if o != pk)
                        found[pk] = (f"{column}_taken", f"new users {others} have it too")
                    continue
                keeper = next((h for h in holders.get(value, ()) if h not in vacated), None)
                if keeper is not None:
                    how = " (left behind by the cut-over)" if keeper in self.left_behind else ""
                    found[pks[0]] = (
                        f"{column}_taken",
                        f"legacy user {keeper}{how} keeps this {column}",
                    )
        return found

    def legacy_holders(self, column, values) -> dict:
        """value -> ids of the legacy rows holding it now."""
        found: dict = {}
        users = User.objects.using(self.alias)
        for chunk in usercopy.chunks(values):
            for value, pk in users.filter(**{f"{column}__in": chunk}).values_list(column, "pk"):
                found.setdefault(value, []).append(pk)
        return found

    def refuse_mass_delete(self, plan: CarryBack):
        """Deleting many legacy users means NewUser lost rows, not that users left."""
        if not NewUser.objects.using(self.alias).exists():
            backup_file = getattr(self, "cutover_backup", "") or "backups/accounts-<time>.jsonl.gz"
            raise CutoverError(
                f"{NewUser._meta.db_table} is empty: the rollback would delete every legacy "
                "user. Restore the cut-over's backup with the setting it was taken with "
                f"(AUTH_USER_MODEL=account.NewUser make restore FILE={backup_file} "
                "ARGS=--replace), then run the rollback again. Nothing was changed."
            )
        total = User.objects.using(self.alias).count()
        limit = min(MASS_DELETE_CEILING, max(MASS_DELETE_FLOOR, int(total * MASS_DELETE_SHARE)))
        if len(plan.deletes) > limit and not self.allow_mass_delete:
            raise CutoverError(
                f"The rollback would delete {len(plan.deletes)} of {total} legacy users (their "
                f"NewUser rows are gone); more than {limit} looks like lost rows, not deleted "
                "users. Check NewUser (restore it from a backup if rows were lost), or run again "
                "with --allow-mass-delete if they were deleted. Nothing was changed."
            )

    def report(self, plan: CarryBack):
        self.refuse_mass_delete(plan)
        counts = self.outcome.counts
        counts.update(
            signups=len(plan.signups),
            changed_users=len(plan.updates),
            deleted=len(plan.deletes),
            skipped=len(plan.skipped),
        )
        counts.update({f"changed_{name}": n for name, n in plan.changed.items()})
        for name, (added, removed) in self.link_changes(plan, apply=False).items():
            counts.update({f"{name}_added": added, f"{name}_removed": removed})
        verb = "would carry back" if self.dry_run else "carries back"
        self.say(
            f"  {verb}: {counts['signups']} signups, {counts['changed_users']} changed users, "
            f"{counts['deleted']} deleted users, link changes "
            f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()) if k.endswith(('_added', '_removed'))) or 'none'}"
        )
        if not plan.problems:
            return
        self.outcome.report = self.write_report(plan.problems)
        reasons = Counter(reason for _, reason, _ in plan.problems)
        listed = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
        if plan.live:  # leaving them out would drop what the new side wrote (a ban, a password)
            live = sorted(plan.live)
            ids = ", ".join(map(str, live[:10])) + (", ..." if len(live) > 10 else "")
            raise CutoverError(
                f"{len(live)} users the legacy table holds have new-side changes it cannot take "
                f"(ids {ids}; {listed}; each listed in {self.outcome.report}). The rollback "
                "would drop them (a ban, a password), --skip-invalid or not: fix them in "
                "NewUser and run again. Nothing was changed."
            )
        if self.skip_invalid:
            self.say(
                f"  {len(plan.problems)} new users stay out of the legacy table ({listed}), "
                f"listed in {self.outcome.report}"
            )
            return
        raise CutoverError(
            f"{len(plan.problems)} new users cannot be carried back into the legacy table "
            f"({listed}); nothing was changed. Each is listed in {self.outcome.report}. Fix "
            "them in NewUser and run again, or leave them out with --skip-invalid."
        )

    def write_report(self, problems) -> Path:
        report_dir = Path(settings.REPORT_DIR)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = report_dir / f"user-rollback-{stamp}-{os.getpid()}.csv"
        try:
            report_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(("new_user_id", "reason", "detail"))
                writer.writerows(problems)
        except OSError as exc:
            raise CutoverError(
                f"Cannot write the rollback's report in {report_dir} ({exc.strerror or exc}): "
                "set REPORT_DIR to a writable directory and run again. Nothing was changed."
            ) from exc
        return path

    def existing_legacy_ids(self, ids) -> set[int]:
        found = set()
        for chunk in usercopy.chunks(ids):
            found.update(
                User.objects.using(self.alias).filter(pk__in=chunk).values_list("pk", flat=True)
            )
        return found

    @contextmanager
    def excluded(self, plan: CarryBack):
        """A temporary table of the users whose links stay as they are in the legacy table."""
        with self.connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS cutover_excluded")
            cursor.execute("CREATE TEMPORARY TABLE cutover_excluded (id bigint PRIMARY KEY)")
            ids = sorted(self.left_behind | set(plan.skipped))
            cursor.executemany("INSERT INTO cutover_excluded (id) VALUES (%s)", [(i,) for i in ids])
            try:
                yield
            finally:
                cursor.execute("DROP TABLE IF EXISTS cutover_excluded")

    def link_changes(self, plan: CarryBack, *, apply: bool) -> dict[str, tuple[int, int]]:
        """Make the legacy group and permission links of each user the plan looked at (the
        change log's, `candidates`) equal NewUser's, but those of users left out."""
        qn = self.connection.ops.quote_name
        changes = {}
        with self.excluded(plan), self.connection.cursor() as cursor:
            for name in ("groups", "user_permissions"):
                legacy, l_user, l_other = usercopy.link_table(User, name)
                new, n_user, n_other = usercopy.link_table(NewUser, name)
                lt, nt = qn(legacy._meta.db_table), qn(new._meta.db_table)
                l_user, l_other, n_user, n_other = map(qn, (l_user, l_other, n_user, n_other))
                stale = (
                    f"FROM {lt} lk WHERE lk.{l_user} NOT IN (SELECT id FROM cutover_excluded) "
                    f"AND lk.{l_user} IN (SELECT id FROM {CANDIDATES}) "
                    f"AND NOT EXISTS (SELECT 1 FROM {nt} nk WHERE nk.{n_user} = lk.{l_user} "
                    f"AND nk.{n_other} = lk.{l_other})"
                )
                fresh = (
                    f"SELECT nk.{n_user}, nk.{n_other} FROM {nt} nk "
                    f"WHERE nk.{n_user} NOT IN (SELECT id FROM cutover_excluded) "
                    f"AND nk.{n_user} IN (SELECT id FROM {CANDIDATES}) "
                    f"AND NOT EXISTS (SELECT 1 FROM {lt} lk WHERE lk.{l_user} = nk.{n_user} "
                    f"AND lk.{l_other} = nk.{n_other})"
                )
                if apply:
                    cursor.execute(f"DELETE FROM {lt} WHERE id IN (SELECT lk.id {stale})")
                    removed = cursor.rowcount
                    cursor.execute(f"INSERT INTO {lt} ({l_user}, {l_other}) {fresh}")
                    added = cursor.rowcount
                else:
                    cursor.execute(f"SELECT COUNT(*) {stale}")
                    removed = cursor.fetchone()[0]
                    cursor.execute(f"SELECT COUNT(*) FROM ({fresh}) x")
                    added = cursor.fetchone()[0]
                changes[name] = (added, removed)
        return changes

    def carry_back(self, plan: CarryBack):
        """Write the plan: deletions first, then the unique values carried rows give up are
        moved out of the way ('~' and the id: no valid username has '~'), then the signups
        and the updates; so a freed username can be reused and two users can swap."""
        qn = self.connection.ops.quote_name
        table = qn(User._meta.db_table)
        cols = ", ".join(qn(c) for c in COLUMNS)
        with self.connection.cursor() as cursor:
            for batch in usercopy.chunks(plan.deletes):
                cursor.execute(
                    f"DELETE FROM {table} WHERE id IN ({', '.join(['%s'] * len(batch))})", batch
                )
            for column, ids in plan.moved_values.items():
                for batch in usercopy.chunks(ids):
                    cursor.execute(
                        f"UPDATE {table} SET {qn(column)} = '~' || CAST(id AS TEXT) "
                        f"WHERE id IN ({', '.join(['%s'] * len(batch))})",
                        batch,
                    )
            if plan.signups:
                marks = ", ".join(["%s"] * (len(COLUMNS) + 1))
                cursor.executemany(
                    f"INSERT INTO {table} (id, {cols}) VALUES ({marks})", plan.signups
                )
            if plan.updates:
                sets = ", ".join(f"{qn(c)} = %s" for c in COLUMNS)
                cursor.executemany(f"UPDATE {table} SET {sets} WHERE id = %s", plan.updates)
        self.link_changes(plan, apply=True)
        # Past every NewUser id too: a user the rollback left out keeps its id for later.
        _advance_sequence(User, self.alias, NewUser)
        for name in ("groups", "user_permissions"):
            _advance_sequence(usercopy.link_table(User, name)[0], self.alias)
        self.say(
            f"  carried back {len(plan.signups)} signups, {len(plan.updates)} changed users, "
            f"deleted {len(plan.deletes)}",
            2,
        )

    def message(self) -> str:
        o = self.outcome
        return (
            f"{len(o.constraints)} foreign keys re-pointed back to {User._meta.db_table}; "
            f"carried back {o.counts['signups']} signups and {o.counts['changed_users']} "
            f"changed users, deleted {o.counts['deleted']}; writers blocked "
            f"{o.blocked_seconds:.1f} s."
        )


# --- entry points ------------------------------------------------------------------------------


def _run(cls, **options) -> Outcome:
    lock_timeout = options["lock_timeout"]
    if not (math.isfinite(lock_timeout) and lock_timeout > 0):
        raise CutoverError(f"lock_timeout must be a number of seconds > 0, got {lock_timeout}")
    run = cls(**options)
    try:
        return run.run()
    except CutoverError as exc:
        run.record_failure(exc)
        raise


def cutover(
    *,
    alias: str = "default",
    dry_run: bool = False,
    skip_invalid: bool = False,
    lock_timeout: float = 5.0,
    say=None,
) -> Outcome:
    """Move the database from the legacy user table to NewUser (see the module docstring)."""
    return _run(
        Cutover,
        alias=alias,
        dry_run=dry_run,
        skip_invalid=skip_invalid,
        lock_timeout=lock_timeout,
        say=say,
        allow_mass_delete=False,
    )


def rollback(
    *,
    alias: str = "default",
    dry_run: bool = False,
    skip_invalid: bool = False,
    allow_mass_delete: bool = False,
    lock_timeout: float = 5.0,
    say=None,
) -> Outcome:
    """Move the database back to the legacy user table, carrying NewUser's writes with it.

    It refuses when NewUser is empty, and when it would delete more than 1% of the legacy
    users (at least 10, at most 1000) unless `allow_mass_delete`.
    """
    return _run(
        Rollback,
        alias=alias,
        dry_run=dry_run,
        skip_invalid=skip_invalid,
        lock_timeout=lock_timeout,
        say=say,
        allow_mass_delete=allow_mass_delete,
    )
