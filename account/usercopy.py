"""Keep NewUser a faithful mirror of the legacy user table: the one engine behind migration
0002 (the first copy), `copy_users` (every re-sync) and `check_user_migration` (pre-flight).

The legacy table is the source until the cut-over. `SyncState` holds, per user the copy made,
a digest of the legacy row and of the new row as the last sync left them, so a sync knows
which side changed since, whatever wrote it. For every user id (the README shows this table):

    legacy row      new row                     what the sync does
    new             -                           insert it (with links and an empty profile)
    new             a signup holds the id       reject: id_taken
    changed         untouched                   carry every field and link across
    changed         changed (or deleted)        conflict: reported by id and field
    unchanged       changed (or deleted)        keep the new side
    deleted         untouched, nothing points   delete it (profile, links) on the new side
                    at it but its empty profile
    deleted         in use, or changed          reject: deleted_but_in_use, or conflict

New users without a SyncState row (signups) are never touched. One sync, in one transaction
that reads the legacy table in one snapshot (REPEATABLE READ on PostgreSQL):

1. lock: a second sync refuses (PostgreSQL advisory lock) or waits (SQLite);
2. plan: one pass over the legacy table compares each row's digest with SyncState and puts
   what there is to do in a temporary table; users deleted from the legacy table are listed;
3. collisions: what only the whole table shows (an email shared by several rows being
   written, an email or username held by another new user, an id held by a signup);
4. check, then write: stream the planned rows in id order through Python, which checks the
   username and password hash and normalises the email and phone (`account.normalize`); the
   accepted rows go to a temporary table with the values Python checked (COPY on
   PostgreSQL). Users removed from the legacy table are deleted. Then one INSERT ... SELECT
   and one UPDATE write every accepted user, taking every other field as it is from the
   legacy row, and replace their links; new users get an empty profile. By default one
   rejected row means nothing is written; with `skip_invalid` the valid rows are written and
   the rejected ones reported;
5. move the id sequence past every legacy id, so a signup never takes a legacy user's id;
6. verify every row written against its legacy row, field by field and link by link, with
   rules of its own; any difference rolls everything back;
7. record the digests of every user written in SyncState.

On PostgreSQL, once migration 0005 installed its triggers (`account.changecapture`), the
change log (ChangeLog, side 'legacy') names every user written since the last sync: the sync
reads it in the same snapshot, runs steps 2 to 7 for exactly those users (a temporary table of
candidates), deletes exactly the log rows it read in the same transaction, and logs the users
it rejected again ('pending'), so that the next sync looks at them as a full compare would. It
compares every user when the log cannot be trusted (`Sync.choose_source`), with `full`, and
always on SQLite.
"""

import csv
import os
import time
from collections import Counter, namedtuple
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path

from django.core.management.base import CommandError
from django.db import DatabaseError, connections, transaction
from django.db.models import Max
from django.utils import timezone

from . import catalog, changecapture, readonly
from .dbutil import analyze, indexes_built_after, reset_sequences
from .normalize import (
    Rejected,
    check_password_hash,
    check_username,
    email_matches,
    normalize_email,
    normalize_phone,
    phone_matches,
)

# The legacy fields read; NewUser receives them (email and phone normalised) plus its times.
FIELDS = (
    "id",
    "password",
    "last_login",
    "is_superuser",
    "username",
    "email",
    "full_name",
    "date_of_birth",
    "phone_number",
    "is_active",
    "is_staff",
)
# Python reads these to check them (username, password) or normalise them (email, phone),
# and they are written as Python passed them; every other field is copied in SQL, as it is,
# from the legacy row.
CHECKED = ("id", "username", "password", "email", "phone_number")
COPIED = tuple(name for name in FIELDS if name not in CHECKED)
Checked = namedtuple("Checked", CHECKED)
LINKS = ("groups", "user_permissions")
PROFILE_WRITE = ("user_id", "bio", "avatar", "updated_at")
LOCK_KEY = 727_001  # pg advisory lock id of the user sync
LOCK_WAIT = 5.0  # seconds a sync waits for another one (the follower's) before it refuses
_BUSY = (
    f"Another user sync is running on this database (still after {LOCK_WAIT:.0f} s); wait for "
    "it to finish, then run again (it will do only what is still to do)."
)


REPORT_FIELDS = ("legacy_id", "username", "reason", "detail")
PLAN = "sync_plan"  # the temporary table of what one sync has to do
VALUES = "sync_values"  # the temporary table of the accepted rows' CHECKED values
DIGESTS = "sync_digests"  # the temporary table of the new rows' digests, before SyncState
LOG_READ = "sync_log"  # the temporary table of the change log's rows this sync read
CANDIDATES = "sync_candidates"  # the temporary table of the users the change log names
SMALL = 900  # ids per IN (...) list: below SQLite's 999 parameters
# Rows per batch streamed through Python (checked, then verified). Peak memory is about two
# batches; 5,000 rows cost no time against 20,000 at a million users and keep it lower.
BATCH = 5_000
NO_DIGEST = "00000000-0000-0000-0000-000000000000"  # matches no row: "changed since"
# What a link's digest holds of the row it points at (`Sync.digest`): its natural key, the
# lookups of Django's `natural_key()` as account/backup.py stores them, never an id.
NATURAL_KEYS = {
    "auth.group": ("name",),
    "auth.permission": ("content_type__app_label", "content_type__model", "codename"),
}


class CopyError(CommandError):
    """The sync refused or failed; nothing was written. The message says what to do."""


@dataclass
class CopyModels:
    """The models the sync reads and writes (historical ones in a migration)."""

    legacy: type
    new: type
    profile: type
    state: type
    log: type | None = None
    changes: type | None = None  # ChangeLog: its legacy side drives the sync (PostgreSQL)

    @classmethod
    def from_apps(cls, apps):
        try:
            changes = apps.get_model("account", "ChangeLog")
        except LookupError:  # before migration 0003
            changes = None
        return cls(
            legacy=apps.get_model("account", "User"),
            new=apps.get_model("account", "NewUser"),
            profile=apps.get_model("account", "Profile"),
            state=apps.get_model("account", "SyncState"),
            log=apps.get_model("account", "OperationLog"),
            changes=changes,
        )


@dataclass
class CopyResult:
    """What a sync (or a dry run of it) did; counts only, no personal data."""

    dry_run: bool = False
    legacy_total: int | None = 0  # None: not counted (the change log named nobody)
    pending: int = 0  # legacy rows new or changed since the last sync, and users deleted
    copied: int = 0  # inserted
    updated: int = 0
    deleted: int = 0
    groups: int = 0
    permissions: int = 0
    rejected: Counter = field(default_factory=Counter)
    # Rejected changes of users already in NewUser (an edit, a ban, a deletion): reason -> n,
    # and the first ids. A re-sync retries them; a cut-over must not leave them behind.
    live_rejected: Counter = field(default_factory=Counter)
    live_rejected_ids: list = field(default_factory=list)
    normalised: Counter = field(default_factory=Counter)
    passwords: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    report: Path | None = None
    # "log": the users the change log names; "full": every user, for `source_reason`.
    source: str = "full"
    source_reason: str = ""
    log_rows: int = 0  # change log rows read (and, when the sync wrote, deleted)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def conflicts(self) -> int:
        return self.rejected["conflict"]

    def reasons(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.rejected.items()))

    @property
    def written(self) -> int:
        return self.copied + self.updated + self.deleted

    def summary(self) -> dict:
        return {
            "legacy_total": self.legacy_total,
            "pending": self.pending,
            "copied": self.copied,
            "updated": self.updated,
            "deleted": self.deleted,
            "conflicts": self.conflicts,
            "groups": self.groups,
            "permissions": self.permissions,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "normalised_by_kind": dict(sorted(self.normalised.items())),
            "password_algorithms": dict(sorted(self.passwords.items())),
            "seconds": round(self.seconds, 2),
            "report": self.report.name if self.report else None,
            "source": self.source,
            "log_rows": self.log_rows,
        }

    def source_line(self) -> str:
        if self.source == "log":
            return f"  from the change log: {self.log_rows} rows read"
        return f"  compared every user: {self.source_reason}"

    def lines(self) -> list[str]:
        would = "would " if self.dry_run else ""
        users = (
            "Legacy users (not counted)"
            if self.legacy_total is None
            else f"{self.legacy_total} legacy users"
        )
        out = [
            f"{users}, {self.pending} new, changed or deleted since the "
            f"last sync: {would}insert {self.copied}, {would}update {self.updated}, "
            f"{would}delete {self.deleted} (with {self.groups} group and {self.permissions} "
            f"permission links) in {self.seconds:.1f} s."
        ]
        if self.source_reason or self.source == "log":
            out.append(self.source_line())
        for reason, n in sorted(self.rejected.items()):
            out.append(f"  rejected, {reason}: {n}")
        for kind, n in sorted(self.normalised.items()):
            out.append(f"  normalised, {kind}: {n}")
        if self.passwords:
            counts = ", ".join(f"{name} {n}" for name, n in sorted(self.passwords.items()))
            out.append(f"  password hashes: {counts}")
        if self.report:
            out.append(f"  report: {self.report}")
        return out


class Report:
    """Rejected rows, one CSV line each, written as they are found (never held in memory)."""

    def __init__(self, report_dir, kind: str):
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        # The process id keeps two syncs started in the same microsecond apart.
        self.path = report_dir / f"user-{kind}-{stamp}-{os.getpid()}.csv"
        # The report names users and their emails: readable by the owner only.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.file = open(fd, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.writer(self.file)
        self.writer.writerow(REPORT_FIELDS)

    def add(self, legacy_id, username, reason, detail):
        self.writer.writerow((legacy_id, username, reason, detail))

    def close(self):
        self.file.close()


def copy_users(
    models: CopyModels,
    *,
    alias: str = "default",
    skip_invalid: bool = False,
    dry_run: bool = False,
    batch_size: int = BATCH,
    report_dir,
    on_progress=None,
    on_start=None,
    full: bool = False,
    record: bool = True,
) -> CopyResult:
    """Bring NewUser in line with the legacy table; see the module docstring for the steps.

    Called inside a transaction (the cut-over holds the legacy tables locked), it runs in a
    savepoint of it and reads in the caller's isolation level. `full`: compare every user even
    when the change log could say which ones changed. `record`: write the run to OperationLog
    (the follower records its refusals and its totals instead, not each sync).
    """
    if readonly.is_read_only(models.legacy, alias):
        raise CopyError(
            "The cut-over is done: NewUser is the source and the legacy table is read-only, so "
            "there is nothing to sync. To go back, run `make cutover-rollback` with "
            "AUTH_USER_MODEL=account.User."
        )
    if batch_size < 1:  # a server-side cursor would fetch nothing, and verify nothing
        raise CopyError(f"The batch size must be at least 1, not {batch_size}.")
    sync = Sync(models, alias, skip_invalid, dry_run, batch_size, on_progress, on_start)
    sync.full = full
    sync.recorded = record
    connection = connections[alias]
    nested = connection.in_atomic_block
    try:
        report = Report(report_dir, "check" if dry_run else "copy")
    except OSError as exc:
        raise CopyError(
            f"Cannot write the report in {report_dir} ({exc.strerror}): set REPORT_DIR to a "
            "directory this user can write."
        ) from None
    sync.result.report = report.path
    sync.report = report
    # In a transaction of its own (PostgreSQL), the sync takes its lock before the
    # transaction begins: its REPEATABLE READ snapshot then starts after the sync before it
    # committed (a lock taken inside would be granted after the snapshot was taken).
    session_lock = sync.postgresql and not nested and not dry_run
    try:
        if session_lock:
            sync.lock(session=True)
        with transaction.atomic(using=alias):
            sync.begin(outermost=not nested)
            # After a rollback NewUser is read-only for the app; the sync is its one writer.
            with readonly.engine_writes(alias):
                sync.run()
            if dry_run:
                transaction.set_rollback(True, using=alias)
    except CopyError as exc:
        sync.log(ok=False, message=str(exc))
        exc.result = sync.result  # what it found (rejected rows by reason), for the follower
        raise
    except DatabaseError as exc:
        message = (
            f"The database refused the sync ({database_error_line(exc)}); nothing was written. "
            "Another process may have written to the user tables meanwhile: run it again."
        )
        sync.log(ok=False, message=message)
        raise CopyError(message) from exc
    finally:
        if session_lock and sync.locked:
            with suppress(DatabaseError), connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
        report.close()
        if not sync.result.rejected_total:
            report.path.unlink(missing_ok=True)
            sync.result.report = None
    sync.log(ok=True, message=sync.result.lines()[0])
    return sync.result


def database_error_line(exc) -> str:
    """What went wrong, in one line and without the values (PostgreSQL's DETAIL names them)."""
    diag = getattr(exc.__cause__, "diag", None)
    if diag is not None and diag.sqlstate:
        where = f", constraint {diag.constraint_name}" if diag.constraint_name else ""
        return f"{type(exc.__cause__).__name__}, SQLSTATE {diag.sqlstate}{where}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _refusal(result: CopyResult) -> str:
    return (
        f"{result.rejected_total} legacy users cannot be synced as they are ({result.reasons()}); "
        f"nothing was written. Every row is listed in {result.report}. Either fix those rows "
        "and run again, or write the valid rows and leave these behind with "
        "USER_COPY_SKIP_INVALID=on (make migrate-data SKIP_INVALID=1)."
    )


class Sync:
    """One sync run; its methods are the steps of the module docstring."""

    def __init__(self, models, alias, skip_invalid, dry_run, batch_size, on_progress, on_start):
        self.models = models
        self.alias = alias
        self.skip_invalid = skip_invalid
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.on_progress = on_progress or (lambda n: None)
        self.on_start = on_start or (lambda n: None)
        self.connection = connections[alias]
        self.qn = self.connection.ops.quote_name
        self.result = CopyResult(dry_run=dry_run)
        self.report = None
        self.recorded = True  # write the run to OperationLog (`copy_users(record=...)`)
        self.outermost = True  # in a transaction of its own (`begin`)
        self.locked = False  # holds the session-level sync lock (`lock(session=True)`)
        self.started, self.started_at = time.perf_counter(), timezone.now()
        self.stamp = timezone.now()  # joined_at of users inserted, updated_at of all written
        self.bad: dict[int, tuple[str, str]] = {}  # rejected before their batch is read
        self.deleted_ids: list[int] = []
        self.full = False  # compare every user, whatever the change log holds
        self.only = ""  # CANDIDATES when the change log drives this sync
        self.log_table = ""  # the change log, when this sync reads (and trims) it
        self.rejected_ids: set[int] = set()  # kept in view by the change log ('pending')

    # Names, SQL fragments and small helpers.

    def table(self, model) -> str:
        return self.qn(model._meta.db_table)

    def column(self, model, name) -> str:
        return self.qn(model._meta.get_field(name).column)

    def links(self, model, name):
        return link_table(model, name)

    def sql(self, sql, params=()):
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else None

    @property
    def postgresql(self) -> bool:
        return self.connection.vendor == "postgresql"

    @property
    def text_type(self) -> str:
        return "text" if self.postgresql else "TEXT"

    @property
    def at(self):
        """The stamp as the ORM stores it, for raw SQL comparisons."""
        return self.connection.ops.adapt_datetimefield_value(self.stamp)

    @property
    def writing(self) -> bool:
        """Once a row is rejected under the default policy nothing will be kept: only classify."""
        return not self.dry_run and (self.skip_invalid or not self.result.rejected_total)

    def reject(self, pk, username, reason, detail, *, live: bool):
        """Report a row; `live`: the user is in NewUser already (its change is what is lost)."""
        self.report.add(pk, username, reason, detail)
        self.result.rejected[reason] += 1
        self.rejected_ids.add(pk)
        if live:
            self.result.live_rejected[reason] += 1
            if len(self.result.live_rejected_ids) < 10:
                self.result.live_rejected_ids.append(pk)

    def digest(
        self, model, row: str, *, correlated: bool, keys: str = "natural"
    ) -> tuple[str, str]:
        """SQL for an MD5 digest of a user row `row` of `model` with its links: (joins, expr).

        The same expression always gives the same digest for the same values, so comparing
        it with the one SyncState recorded tells whether anything changed. `correlated` reads
        the links per row (cheap for a few rows); otherwise they are joined, grouped once.
        Both variants give the same digest.

        `keys`: how a link enters the digest. "natural" (what the sync uses): by the natural
        key of what it points at, as the backup stores it (`NATURAL_KEYS`: a group by its name,
        a permission by its content type's app label and model and its codename), sorted by
        that key, so a restore that gives groups and permissions other ids changes no digest.
        "ids": the formula before migration 0004 (the group and permission ids, sorted by id),
        kept for 0004, which rewrites the digests recorded with it (and its reverse back), and
        for `uncopy_users`, which runs after that reverse. Neither formula may change without
        a migration rewriting SyncState in the same way.
        """
        if keys not in ("natural", "ids"):
            raise ValueError(f"keys must be 'natural' or 'ids', not {keys!r}")
        qn, pg = self.qn, self.postgresql
        names = [n for n in FIELDS if n != "id"]
        if model is self.models.new:
            names += ["joined_at", "updated_at"]  # any save(), even one that changes no value
        values = [f"{row}.{self.column(model, n)}" for n in names]
        joins = []
        for i, name in enumerate(LINKS):
            if keys == "natural":
                source, user_col, key, order = self.natural_key_links(model, name, f"{row}_k{i}")
            else:
                through, user_col, other_col = self.links(model, name)
                link = f"{row}_k{i}"
                source = f"{self.table(through)} {link}"
                user_col = f"{link}.{qn(user_col)}"
                key, order = f"{link}.{qn(other_col)}", [f"{link}.{qn(other_col)}"]
            if pg:
                agg = f"array_agg({key} ORDER BY {', '.join(order)})"
                if correlated:
                    values.append(f"(SELECT {agg} FROM {source} WHERE {user_col} = {row}.id)")
                    continue
                joins.append(
                    f"LEFT JOIN (SELECT {user_col} AS u, {agg} AS ids FROM {source} "
                    f"GROUP BY {user_col}) {row}_l{i} ON {row}_l{i}.u = {row}.id"
                )
            else:
                # group_concat follows the order of the rows its subquery sorted.
                if correlated:
                    values.append(
                        f"(SELECT group_concat(x) FROM (SELECT {key} AS x FROM {source} "
                        f"WHERE {user_col} = {row}.id ORDER BY {', '.join(order)}))"
                    )
                    continue
                joins.append(
                    f"LEFT JOIN (SELECT u, group_concat(x) AS ids FROM (SELECT {user_col} AS u, "
                    f"{key} AS x FROM {source} ORDER BY u, {', '.join(order)}) GROUP BY u) "
                    f"{row}_l{i} ON {row}_l{i}.u = {row}.id"
                )
            values.append(f"{row}_l{i}.ids")
        if pg:
            return " ".join(joins), f"md5(ROW({', '.join(values)})::text)::uuid"
        return " ".join(joins), "MD5(" + " || ',' || ".join(f"quote({v})" for v in values) + ")"

    def natural_key_links(self, model, name, alias: str) -> tuple[str, str, str, list[str]]:
        """The links `model.<name>` by the natural key of what they point at, for `digest`:
        (FROM source, its user column, the key as one value, the key's ORDER BY terms).

        The source is the link table (as `alias`) joined with the tables of the key (the
        group; the permission and its content type), found through the models' fields, so
        historical models work too. PostgreSQL sorts in the "C" collation (byte order) and
        SQLite in BINARY: the order never depends on the database's collation. The key is one
        value for one column (a group's name), else a ROW (SQLite: the quoted columns joined
        by commas, which quoting keeps unambiguous)."""
        qn, pg = self.qn, self.postgresql
        m2m = model._meta.get_field(name)
        through, user_col, other_col = link_table(model, name)
        target = m2m.remote_field.model
        source = [f"{self.table(through)} {alias}"]
        tables = {(): (f"{alias}_0", target)}
        source.append(
            f"JOIN {self.table(target)} {alias}_0 "
            f"ON {alias}_0.{qn(target._meta.pk.column)} = {alias}.{qn(other_col)}"
        )
        columns = []
        for lookup in NATURAL_KEYS[target._meta.label_lower]:
            *path, last = lookup.split("__")
            for n in range(len(path)):
                if tuple(path[: n + 1]) in tables:
                    continue
                here, here_model = tables[tuple(path[:n])]
                fk = here_model._meta.get_field(path[n])
                there, there_model = f"{alias}_{len(tables)}", fk.remote_field.model
                source.append(
                    f"JOIN {self.table(there_model)} {there} ON "
                    f"{there}.{qn(fk.target_field.column)} = {here}.{qn(fk.column)}"
                )
                tables[tuple(path[: n + 1])] = (there, there_model)
            here, here_model = tables[tuple(path)]
            columns.append(f"{here}.{self.column(here_model, last)}")
        collate = 'COLLATE "C"' if pg else "COLLATE BINARY"
        order = [f"{c} {collate}" for c in columns]
        if len(columns) == 1:
            key = columns[0] if pg else f"quote({columns[0]})"
        else:
            key = (
                f"ROW({', '.join(columns)})"
                if pg
                else " || ',' || ".join(f"quote({c})" for c in columns)
            )
        return " ".join(source), f"{alias}.{qn(user_col)}", key, order

    # The steps.

    def begin(self, *, outermost: bool):
        self.outermost = outermost
        if self.postgresql and outermost:
            # One snapshot of the legacy table for every read of this sync.
            self.sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def run(self):
        if not self.dry_run:
            self.lock()  # inside a caller's transaction; a no-op under the session lock
        saved = self.tune()
        legacy = self.models.legacy.objects.using(self.alias)
        self.max_legacy_id = legacy.aggregate(m=Max("pk"))["m"] or 0
        self.drop_temporary_tables()
        failure = None
        try:
            if self.postgresql:
                # The sync's own SyncState writes: no 'full' row in the change log for them.
                self.set_local({changecapture.SYNC_SETTING: "on"})
            self.choose_source()
            self.sync_users()
            if not self.dry_run:
                self.trim_log()
            if self.postgresql:
                self.set_local({changecapture.SYNC_SETTING: ""})
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # After a database error the transaction is aborted: its rollback drops the tables.
            if not isinstance(failure, DatabaseError):
                self.drop_temporary_tables()
            if failure is None:
                # After a failure the rollback restores them by itself.
                self.set_local(saved)
            self.result.seconds = time.perf_counter() - self.started

    def sync_users(self):
        """Steps 2 to 7 of the module docstring."""
        planned = self.plan()
        removed = self.removed_users()
        self.result.pending = planned + len(removed)
        if not self.only:
            # Counting a million rows takes longer (90 ms) than a sync from the change log
            # (the follower runs several a second): only the full compare counts them.
            self.result.legacy_total = self.models.legacy.objects.using(self.alias).count()
        else:
            self.result.legacy_total = None
        self.on_start(self.result.pending)
        if not self.result.pending:
            return
        self.find_collisions()
        first_load = not self.dry_run and not self.state_or_new_exist()
        tables = [self.models.new, self.models.profile]
        with indexes_built_after(tables, self.alias) if first_load else nullcontext():
            self.check_rows()
            self.delete_removed(removed)
            if self.writing:
                self.write_rows()
                self.create_profiles()
        if self.dry_run:
            return
        # Before a refusal too: PostgreSQL's setval is not rolled back, so no signup takes
        # a legacy id meanwhile (SQLite's counter is rolled back with the rest).
        self.advance_sequences()
        if self.result.rejected_total and not self.skip_invalid:
            raise CopyError(_refusal(self.result))
        if not self.result.written:
            return
        if not self.only:
            links = [self.links(self.models.new, name)[0] for name in LINKS]
            # Fresh statistics, or the planner takes the new tables for empty and
            # verifies slowly (a few users from the change log change no statistics).
            analyze([self.models.new, self.models.profile, *links], self.alias)
        self.verify()
        self.record()

    def choose_source(self):
        """Read the change log (PostgreSQL), in this sync's snapshot, into LOG_READ; when it can
        be trusted, put the users it names in CANDIDATES and restrict every step to them.

        It cannot be trusted, and every user is compared, when: a capture trigger is missing
        or disabled, a 'full' row is in it (the triggers were installed, a TRUNCATE, a
        renamed group, permission or content type, SyncState written outside the sync), or
        SyncState is empty (the first copy); or when asked (`full`)."""
        m, r = self.models, self.result
        if not self.postgresql:
            r.source_reason = ""  # SQLite: there is no change log; every user, as always
            return
        log = m.changes._meta.db_table if m.changes is not None else ""
        if log and self.sql("SELECT to_regclass(%s) IS NOT NULL", [self.qn(log)])[0][0]:
            self.log_table = self.qn(log)
            side = m.changes.Side.LEGACY
            self.sql(
                f"CREATE TEMP TABLE {LOG_READ} ON COMMIT DROP AS SELECT id, user_id, op "
                f"FROM {self.log_table} WHERE side = %s",
                [side],
            )
            r.log_rows = self.sql(f"SELECT COUNT(*) FROM {LOG_READ}")[0][0]
        missing = changecapture.missing(self.connection)
        if self.full:
            r.source_reason = "asked for (--full)"
        elif not self.log_table or missing:
            r.source_reason = (
                "the change capture triggers are missing or disabled "
                f"({', '.join(missing[:3]) or 'no change log'}): run `python manage.py migrate`"
            )
        elif self.sql(f"SELECT EXISTS (SELECT 1 FROM {LOG_READ} WHERE op = 'full')")[0][0]:
            r.source_reason = (
                "the change log asks for it (its triggers were installed, a TRUNCATE, a "
                "renamed group or permission, or sync state written outside the sync)"
            )
        elif not m.state.objects.using(self.alias).exists():
            r.source_reason = "no sync state yet (the first copy)"
        else:
            r.source = "log"
            self.only = CANDIDATES
            self.sql(
                f"CREATE TEMP TABLE {CANDIDATES} ON COMMIT DROP AS "
                f"SELECT DISTINCT user_id AS id FROM {LOG_READ}"
            )
            self.sql(f"CREATE UNIQUE INDEX {CANDIDATES}_id ON {CANDIDATES} (id)")
            self.sql(f"ANALYZE {CANDIDATES}")

    def trim_log(self):
        """Delete exactly the change log rows this sync read (never by a range of ids: a
        writer may commit a lower id after the snapshot), in its transaction; then log the
        users it rejected or found in conflict again ('pending'), so that the next sync
        looks at them again, as a full compare would."""
        if not self.log_table:
            return
        self.sql(f"DELETE FROM {self.log_table} WHERE id IN (SELECT id FROM {LOG_READ})")
        side, pending = self.models.changes.Side.LEGACY, self.models.changes.Op.PENDING
        for chunk in chunks(sorted(self.rejected_ids), SMALL):
            marks = ", ".join(["(%s)"] * len(chunk))
            self.sql(
                f"INSERT INTO {self.log_table} (side, user_id, op, at) "
                f"SELECT %s, v.id, %s, now() FROM (VALUES {marks}) v (id)",
                [side, pending, *chunk],
            )

    def among(self, column: str, ids: str) -> str:
        """`column IN (ids)`; `= ANY(array)` when the change log drives the sync (few ids: the
        planner looks them up by index instead of hashing them against a scan of the table)."""
        if not self.only:
            return f"{column} IN ({ids})"
        return f"{column} = ANY((SELECT array_agg(id) FROM ({ids}) a)::bigint[])"

    def restricted(self, column: str) -> str:
        """`AND column` is a candidate, when the change log drives the sync, else ''.

        As `= ANY(array)`, not `IN (SELECT ...)`: the planner then looks the candidates up by
        the primary key. With a semi-join it estimated one row for `updated_at = <this run>`
        (a value its statistics have never seen) and joined a million rows with a nested
        loop over the candidates: seconds instead of milliseconds (measured, a million users).
        """
        if not self.only:
            return ""
        return f" AND {column} = ANY((SELECT array_agg(id) FROM {self.only})::bigint[])"

    def drop_temporary_tables(self):
        # Qualified: never a permanent table that happens to have the same name.
        schema = "pg_temp" if self.postgresql else "temp"
        for table in (PLAN, VALUES, DIGESTS, LOG_READ, CANDIDATES):
            self.sql(f"DROP TABLE IF EXISTS {schema}.{table}")

    def utc(self):
        """Digests print timestamps as text: in UTC, whatever the session's time zone."""
        if self.postgresql:
            self.sql("SET LOCAL TimeZone = 'UTC'")

    def tune(self) -> dict[str, str]:
        """Set PostgreSQL's settings for the sync; returns the values they replace, which
        `run` sets back when it ends (called inside a caller's transaction, SET LOCAL would
        last until the caller's transaction ends)."""
        if not self.postgresql:
            return {}
        settings = {
            "TimeZone": "UTC",  # digests print timestamps as text: in UTC, whatever the zone
            "work_mem": "64MB",  # group and hash a million emails and ids in memory
            # `indexes_built_after` raises it for a first load: given back with the others.
            "maintenance_work_mem": "256MB",
            # Let the digest passes run in parallel workers (max_parallel_workers_per_gather,
            # 2 by default): the planner cannot know that a digest comparison keeps few rows,
            # and on its default costs it plans the million digests in one process.
            "parallel_setup_cost": "0",
            "parallel_tuple_cost": "0",
            # The correlated digests inflate the cost estimates past the JIT thresholds:
            # compiling the plans took longer than it saved (measured, a million users).
            "jit": "off",
        }
        saved = {name: self.sql("SELECT current_setting(%s)", [name])[0][0] for name in settings}
        self.set_local(settings)
        return saved

    def set_local(self, settings: dict[str, str]):
        for name, value in settings.items():
            self.sql("SELECT set_config(%s, %s, true)", [name, value])

    def lock(self, session: bool = False):
        """One sync at a time (PostgreSQL); SQLite queues writers by itself. A second sync
        waits up to LOCK_WAIT seconds for the first, then refuses. `session`: before the
        sync's own transaction, in autocommit (released by `copy_users` at its end);
        otherwise for the caller's transaction (the cut-over's switch, READ COMMITTED: each
        try is a new statement, with a new snapshot), unless the session lock is held."""
        if not self.postgresql or (self.locked and not session):
            return
        take = "pg_try_advisory_lock" if session else "pg_try_advisory_xact_lock"
        deadline = time.monotonic() + LOCK_WAIT
        while not self.sql(f"SELECT {take}(%s)", [LOCK_KEY])[0][0]:
            repeatable = (
                not session and self.sql("SHOW transaction_isolation")[0][0] != "read committed"
            )
            if repeatable or time.monotonic() >= deadline:
                raise CopyError(_BUSY)
            time.sleep(0.05)
        self.locked = session

    def state_or_new_exist(self) -> bool:
        m = self.models
        return any(
            model.objects.using(self.alias).exists() for model in (m.new, m.profile, m.state)
        )

    def plan(self) -> int:
        """Put every legacy row new or changed since the last sync in PLAN, with its action,
        its legacy digest and its email key (`find_collisions`)."""
        m, pg = self.models, self.postgresql
        # A few users from the change log: their links read per user, not every link grouped.
        joins, legacy_digest = self.digest(m.legacy, "l", correlated=bool(self.only))
        _, new_digest = self.digest(m.new, "n", correlated=True)
        new_t, state_t = self.table(m.new), self.table(m.state)
        email = self.column(m.legacy, "email")
        ascii_email = (
            f"octet_length(l.{email}) = char_length(l.{email})"
            if pg
            else f"length(CAST(l.{email} AS BLOB)) = length(l.{email})"
        )
        # CREATE TABLE AS, not INSERT ... SELECT: PostgreSQL runs it in parallel workers.
        # The legacy digest is kept: `record` writes it, as the snapshot had it.
        self.sql(
            f"""CREATE TEMP TABLE {PLAN} {"ON COMMIT DROP" if pg else ""} AS
            SELECT x.id, CASE
                WHEN x.synced IS NULL THEN CASE
                    WHEN EXISTS (SELECT 1 FROM {new_t} n WHERE n.id = x.id) THEN 'id_taken'
                    ELSE 'insert' END
                WHEN NOT EXISTS (SELECT 1 FROM {new_t} n WHERE n.id = x.id) THEN 'gone'
                WHEN (SELECT {new_digest} FROM {new_t} n WHERE n.id = x.id) <> x.new_then
                    THEN 'conflict'
                ELSE 'update' END AS action, x.digest AS legacy_digest, x.email_key
            FROM (SELECT l.id, s.user_id AS synced, s.legacy_digest AS legacy_then,
                    s.new_digest AS new_then, {legacy_digest} AS digest,
                    CASE WHEN {ascii_email} THEN LOWER(TRIM(l.{email})) ELSE '' END AS email_key
                FROM {self.table(m.legacy)} l
                LEFT JOIN {state_t} s ON s.user_id = l.id
                {joins} WHERE 1 = 1{self.restricted("l.id")}) x
            WHERE x.synced IS NULL OR x.digest <> x.legacy_then"""
        )
        self.sql(f"CREATE UNIQUE INDEX {PLAN}_id ON {PLAN} (id)")
        if pg:
            self.sql(f"ANALYZE {PLAN}")
        return self.sql(f"SELECT COUNT(*) FROM {PLAN}")[0][0]

    def removed_users(self) -> list[tuple[int, str]]:
        """Users the last sync saw that are no longer in the legacy table, with their action."""
        m = self.models
        _, new_digest = self.digest(m.new, "n", correlated=True)
        new_t = self.table(m.new)
        return self.sql(
            f"""SELECT s.user_id, CASE
                WHEN NOT EXISTS (SELECT 1 FROM {new_t} n WHERE n.id = s.user_id) THEN 'forget'
                WHEN (SELECT {new_digest} FROM {new_t} n WHERE n.id = s.user_id) <> s.new_digest
                    THEN 'conflict'
                ELSE 'delete' END
            FROM {self.table(m.state)} s
            WHERE NOT EXISTS (SELECT 1 FROM {self.table(m.legacy)} l WHERE l.id = s.user_id)
            {self.restricted("s.user_id")}
            ORDER BY s.user_id"""
        )

    def find_collisions(self):
        """Rows rejected for what only the whole table shows; kept in `self.bad` by id.

        Email keys are the plan's `email_key`, LOWER(TRIM(email)) as the new unique index
        compares them, and only for ASCII emails (the rule rejects the others): there Python
        and the database agree on case and on what a space is.
        """
        m = self.models
        legacy_t, new_t = self.table(m.legacy), self.table(m.new)
        username = self.column(m.legacy, "username")
        new_email, new_username = self.column(m.new, "email"), self.column(m.new, "username")
        written = "p.action IN ('insert', 'update') AND p.email_key <> ''"
        # An email key several rows would write at once (an update keeping its key is not new).
        keeps_key = (
            f"EXISTS (SELECT 1 FROM {new_t} n "
            f"WHERE n.id = p.id AND LOWER(n.{new_email}) = p.email_key)"
        )
        if self.only:
            # A few users from the change log: each looked up by id (a scalar subquery stays
            # one lookup a row; NOT EXISTS becomes a hash join over every new user).
            keeps_key = (
                f"(SELECT LOWER(n.{new_email}) FROM {new_t} n WHERE n.id = p.id) = p.email_key"
            )
        if not m.new.objects.using(self.alias).exists():
            keeps_key = "1 = 0"  # the first copy: no new user keeps anything
        changing = f"{written} AND NOT COALESCE({keeps_key}, false)"
        for pk, shared, n in self.sql(
            f"""WITH changing AS {"MATERIALIZED" if self.postgresql else ""} (
                SELECT p.id, p.email_key FROM {PLAN} p WHERE {changing})
            SELECT c.id, g.k, g.n FROM changing c
            JOIN (SELECT email_key AS k, COUNT(*) AS n FROM changing
                GROUP BY email_key HAVING COUNT(*) > 1) g ON g.k = c.email_key"""
        ):
            self.bad[pk] = (
                "email_duplicate",
                f"{n} legacy users share the email {shared!r} (any case); all of them are listed",
            )
        if not m.new.objects.using(self.alias).exists():
            return
        if self.only:
            # A few users from the change log: looked up by index, one by one, not hashed
            # against a scan of every new user.
            taken_email = f"""SELECT id, other FROM (SELECT p.id, (SELECT MIN(n.id) FROM
                {new_t} n WHERE LOWER(n.{new_email}) = p.email_key AND n.id <> p.id) AS other
                FROM {PLAN} p WHERE {written}) x WHERE other IS NOT NULL"""
            taken_username = f"""SELECT id, other FROM (SELECT p.id, (SELECT MIN(n.id) FROM
                {new_t} n WHERE n.{new_username} = (SELECT l.{username} FROM {legacy_t} l
                WHERE l.id = p.id) AND n.id <> p.id) AS other FROM {PLAN} p
                WHERE p.action IN ('insert', 'update')) x WHERE other IS NOT NULL"""
        else:
            taken_email = f"""SELECT p.id, MIN(n.id) FROM {PLAN} p
                JOIN {new_t} n ON LOWER(n.{new_email}) = p.email_key AND n.id <> p.id
                WHERE {written} GROUP BY p.id"""
            taken_username = f"""SELECT p.id, n.id FROM {PLAN} p
                JOIN {legacy_t} l ON l.id = p.id
                JOIN {new_t} n ON n.{new_username} = l.{username} AND n.id <> p.id
                WHERE p.action IN ('insert', 'update')"""
        for pk, other in self.sql(taken_email):
            self.bad.setdefault(pk, ("email_taken", f"email already used by new user {other}"))
        for pk, other in self.sql(taken_username):
            self.bad.setdefault(
                pk, ("username_taken", f"username already used by new user {other}")
            )

    def check_rows(self):
        """Stream the planned rows in id order and check what Python owns: the username and
        password hash are checked, the email and phone normalised. The accepted rows go to
        VALUES as Python checked them; `write_rows` copies every other field in SQL."""
        m = self.models
        self.sql(
            f"CREATE TEMP TABLE {VALUES} (id bigint, action varchar(10), username varchar(150), "
            "password varchar(128), email varchar(254), phone_number varchar(128))"
            + (" ON COMMIT DROP" if self.postgresql else "")
        )
        read = ", ".join(f"l.{self.column(m.legacy, name)}" for name in CHECKED)
        # One server-side cursor on PostgreSQL: memory stays flat, the tables are read once.
        with self.connection.chunked_cursor() as cursor:
            cursor.execute(
                f"SELECT p.action, {read} FROM {PLAN} p "
                f"JOIN {self.table(m.legacy)} l ON l.id = p.id ORDER BY p.id"
            )
            while batch := cursor.fetchmany(self.batch_size):
                self.check_batch(batch)

    def check_batch(self, batch):
        """Check one batch of (action, *CHECKED) rows; add the accepted ones to VALUES."""
        accepted, conflicts = [], []
        # A new user holding a legacy id with the same username is that person (their ledger
        # row was lost): their rejected change is a live user's, never dropped silently.
        taken = [Checked(*values) for action, *values in batch if action == "id_taken"]
        holders = dict(
            self.models.new.objects.using(self.alias)
            .filter(pk__in=[row.id for row in taken])
            .values_list("pk", "username")
        ) if taken else {}  # fmt: skip
        for action, *values in batch:
            row = Checked(*values)
            if action == "conflict" or action == "gone":
                conflicts.append(row.id)
            elif action == "id_taken":
                same = (holders.get(row.id) or "").lower() == (row.username or "").lower()
                self.reject(row.id, row.username, "id_taken",
                            f"id {row.id} already belongs to a new user the copy did not make"
                            + (" (with this username: the same person?)" if same else ""),
                            live=same)  # fmt: skip
            elif (new := self.normalise(row, live=action != "insert")) is not None:
                accepted.append((row.id, action, row.username, row.password, *new))
        accepted += [(pk, "update", *new) for pk, *new in self.report_conflicts(conflicts)]
        inserted = sum(1 for row in accepted if row[1] == "insert")
        self.result.copied += inserted
        self.result.updated += len(accepted) - inserted
        if self.writing and accepted:
            self.load_values(accepted)
        self.on_progress(len(batch))

    def load_values(self, rows):
        """Add (id, action, *CHECKED values) rows to VALUES: COPY on PostgreSQL."""
        columns = "id, action, username, password, email, phone_number"
        if self.postgresql:
            sql = f"COPY {VALUES} ({columns}) FROM STDIN"
            # The raw psycopg cursor's errors become Django's DatabaseError, like any other.
            with (
                self.connection.wrap_database_errors,
                self.connection.cursor() as cursor,
                cursor.cursor.copy(sql) as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            return
        with self.connection.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {VALUES} ({columns}) VALUES (%s, %s, %s, %s, %s, %s)", rows
            )

    def write_rows(self):
        """Write every accepted row in SQL: the values Python checked (username, password,
        email, phone) from VALUES, every other field as the legacy row holds it; then replace
        the links of the users written."""
        m, qn = self.models, self.qn
        self.sql(f"CREATE UNIQUE INDEX {VALUES}_id ON {VALUES} (id)")  # one row per user
        if self.postgresql:
            self.sql(f"ANALYZE {VALUES}")  # its real size, for the join's plan
        new_t, legacy_t = self.table(m.new), self.table(m.legacy)
        checked = [self.column(m.new, name) for name in CHECKED[1:]]
        copied = [(self.column(m.new, name), self.column(m.legacy, name)) for name in COPIED]
        new_columns = ", ".join([*checked, *(n for n, _ in copied)])
        values = ", ".join([*(f"v.{name}" for name in CHECKED[1:]), *(f"l.{o}" for _, o in copied)])
        source = f"FROM {VALUES} v JOIN {legacy_t} l ON l.id = v.id"
        joined, updated = self.column(m.new, "joined_at"), self.column(m.new, "updated_at")
        updates = "'update'"
        self.sql(
            f"INSERT INTO {new_t} (id, {new_columns}, {joined}, {updated}) "
            f"SELECT v.id, {values}, %s, %s {source} WHERE v.action = 'insert'",
            [self.at, self.at],
        )
        if self.result.updated:
            # A row-value UPDATE, not UPDATE ... FROM: SQLite has the latter only since 3.33.
            self.sql(
                f"UPDATE {new_t} SET ({new_columns}, {updated}) = "
                f"(SELECT {values}, %s {source} WHERE v.id = {new_t}.id) "
                f"WHERE {self.among('id', f'SELECT id FROM {VALUES} WHERE action = {updates}')}",
                [self.at],
            )
        for name in LINKS:
            src, src_user, src_other = self.links(m.legacy, name)
            dst, dst_user, dst_other = self.links(m.new, name)
            if self.result.updated:
                self.sql(
                    f"DELETE FROM {self.table(dst)} WHERE "
                    + self.among(qn(dst_user), f"SELECT id FROM {VALUES} WHERE action = {updates}")
                )
            with self.connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {self.table(dst)} ({qn(dst_user)}, {qn(dst_other)}) "
                    f"SELECT s.{qn(src_user)}, s.{qn(src_other)} FROM {self.table(src)} s "
                    f"JOIN {VALUES} v ON v.id = s.{qn(src_user)}"
                )
                if name == "groups":
                    self.result.groups += cursor.rowcount
                else:
                    self.result.permissions += cursor.rowcount

    def normalise(self, row, *, live: bool) -> tuple[str, str] | None:
        """A legacy row's new email and phone, its username and password checked; None (and
        reported) if rejected. `row` has at least the CHECKED fields."""
        try:
            if row.id in self.bad:
                raise Rejected(*self.bad[row.id])
            check_username(row.username)
            algorithm = check_password_hash(row.password)
            email, email_change = normalize_email(row.email)
            phone, phone_change = normalize_phone(row.phone_number)
        except Rejected as rejected:
            self.reject(row.id, row.username, rejected.reason, rejected.detail, live=live)
            return None
        self.result.passwords[algorithm] += 1
        for change in (email_change, phone_change):
            if change:
                self.result.normalised[change] += 1
        return email, phone

    def report_conflicts(self, ids) -> list[tuple]:
        """Users changed on both sides: name the fields where the two sides now differ.

        When they no longer differ (someone made them equal), the user is synced again: its
        id and CHECKED values are returned, to be written and recorded like an update.
        """
        resolved = []
        if not ids:
            return resolved
        m = self.models
        legacy, new = (
            {
                r.id: r
                for chunk in chunks(ids, SMALL)
                for r in model.objects.using(self.alias)
                .filter(pk__in=chunk)
                .values_list(*FIELDS, named=True)
            }
            for model in (m.legacy, m.new)
        )
        legacy_links, new_links = self.link_sets(m.legacy, ids), self.link_sets(m.new, ids)
        for pk in ids:
            row, other = legacy.get(pk), new.get(pk)
            if row is None:
                # Deleted since the plan read it: possible only nested in a caller's READ
                # COMMITTED transaction. Nothing is written; the next sync sees the deletion.
                continue
            if other is None:
                self.reject(pk, row.username, "conflict",
                            "changed in the legacy table, deleted on the new side",
                            live=True)  # fmt: skip
                continue
            values = row._asdict()
            try:
                values["email"] = normalize_email(row.email)[0]
                values["phone_number"] = normalize_phone(row.phone_number)[0]
            except Rejected:
                pass
            fields = [n for n in FIELDS if values[n] != getattr(other, n)]
            fields += [n for n in LINKS if legacy_links[n].get(pk) != new_links[n].get(pk)]
            if not fields and (normalised := self.normalise(row, live=True)) is not None:
                resolved.append((pk, row.username, row.password, *normalised))
                continue
            self.reject(pk, row.username, "conflict",
                        "changed on both sides since the last sync; fields that differ now: "
                        + (", ".join(fields) or "none, but the legacy row cannot be synced"),
                        live=True)  # fmt: skip
        return resolved

    def link_sets(self, model, ids) -> dict[str, dict[int, set]]:
        out = {}
        for name in LINKS:
            through, user_col, other_col = self.links(model, name)
            sets: dict[int, set] = {}
            for chunk in chunks(ids, SMALL):
                for user_id, other in (
                    through.objects.using(self.alias)
                    .filter(**{f"{user_col}__in": chunk})
                    .values_list(user_col, other_col)
                ):
                    sets.setdefault(user_id, set()).add(other)
            out[name] = sets
        return out

    def delete_links(self, ids):
        for name in LINKS:
            through, user_col, _ = self.links(self.models.new, name)
            for chunk in chunks(ids, SMALL):
                through.objects.using(self.alias).filter(**{f"{user_col}__in": chunk}).delete()

    def delete_removed(self, removed):
        """Delete on the new side the users deleted from the legacy table, when nothing is lost."""
        m = self.models
        to_delete = [pk for pk, action in removed if action == "delete"]
        forget = [pk for pk, action in removed if action == "forget"]
        usernames = {}
        for chunk in chunks([pk for pk, action in removed if action != "forget"], SMALL):
            usernames.update(
                m.new.objects.using(self.alias).filter(pk__in=chunk).values_list("pk", "username")
            )
        for pk, action in removed:
            if action == "conflict":
                self.reject(pk, usernames.get(pk, ""), "conflict",
                            "deleted from the legacy table, changed on the new side",
                            live=True)  # fmt: skip
        in_use = self.users_in_use(to_delete)
        for pk, tables in sorted(in_use.items()):
            self.reject(pk, usernames.get(pk, ""), "deleted_but_in_use",
                        f"deleted from the legacy table, but rows in {', '.join(tables)} "
                        "point at the new user", live=True)  # fmt: skip
        to_delete = [pk for pk in to_delete if pk not in in_use]
        self.result.deleted = len(to_delete)
        if not self.writing:
            return
        self.deleted_ids = to_delete
        self.delete_links(to_delete)
        for chunk in chunks(to_delete + forget, SMALL):
            m.profile.objects.using(self.alias).filter(user_id__in=chunk).delete()
            m.state.objects.using(self.alias).filter(pk__in=chunk).delete()
            # Raw: the catalog showed nothing else points at them (the ORM's collector would
            # also query tables of apps that may not be migrated).
            marks = ", ".join(["%s"] * len(chunk))
            self.sql(f"DELETE FROM {self.table(m.new)} WHERE id IN ({marks})", chunk)

    def users_in_use(self, ids) -> dict[int, list[str]]:
        """The users in `ids` that rows other than the copy's own (empty profile, links) name:
        any foreign key to NewUser or to the user's profile (deleted with it) in any schema
        (the catalog), whatever its ON DELETE, and any generic reference (content type and
        object id) to a new user or a profile."""
        if not ids:
            return {}
        m = self.models
        own = {self.links(m.new, name)[0]._meta.db_table for name in LINKS}
        own.add(m.profile._meta.db_table)
        new_t = self.table(m.new)
        found: dict[int, list[str]] = {}

        def add(sql, what):
            for chunk in chunks(ids, SMALL):
                marks = ", ".join(["%s"] * len(chunk))
                for (pk,) in self.sql(sql.format(marks=marks), chunk):
                    if what not in found.setdefault(pk, []):
                        found[pk].append(what)

        for fk in catalog.foreign_keys_to(m.new._meta.db_table, using=self.alias, exclude=own):
            add(
                f"SELECT DISTINCT t.id FROM {new_t} t "
                f"JOIN {catalog.sql_name(fk.table, self.alias)} r "
                f"ON {catalog.match(fk, qn=self.qn)} WHERE t.id IN ({{marks}})",
                fk.table,
            )
        if (ct := catalog.content_type_id(m.new, using=self.alias)) is not None:
            for pair in catalog.generic_pairs(using=self.alias):
                add(
                    f"SELECT DISTINCT t.id FROM {new_t} t "
                    f"JOIN {catalog.sql_name(pair.table, self.alias)} r "
                    f"ON CAST(r.{self.qn(pair.object_id)} AS {self.text_type}) "
                    f"= CAST(t.id AS {self.text_type}) "
                    f"AND r.{self.qn(pair.content_type)} = {int(ct)} WHERE t.id IN ({{marks}})",
                    f"{pair} (generic)",
                )
        # The profile goes with the user: rows pointing at it are in use too (any schema).
        profile_t = self.table(m.profile)
        user_col = self.qn(m.profile._meta.get_field("user").column)
        for fk in catalog.foreign_keys_to(m.profile._meta.db_table, using=self.alias):
            add(
                f"SELECT DISTINCT t.{user_col} FROM {profile_t} t "
                f"JOIN {catalog.sql_name(fk.table, self.alias)} r "
                f"ON {catalog.match(fk, qn=self.qn)} WHERE t.{user_col} IN ({{marks}})",
                f"{fk.table} (through the profile)",
            )
        if (ct := catalog.content_type_id(m.profile, using=self.alias)) is not None:
            pk_col = self.qn(m.profile._meta.pk.column)
            for pair in catalog.generic_pairs(using=self.alias):
                add(
                    f"SELECT DISTINCT t.{user_col} FROM {profile_t} t "
                    f"JOIN {catalog.sql_name(pair.table, self.alias)} r "
                    f"ON CAST(r.{self.qn(pair.object_id)} AS {self.text_type}) "
                    f"= CAST(t.{pk_col} AS {self.text_type}) "
                    f"AND r.{self.qn(pair.content_type)} = {int(ct)} "
                    f"WHERE t.{user_col} IN ({{marks}})",
                    f"{pair} (generic, through the profile)",
                )
        profiles = m.profile.objects.using(self.alias).exclude(bio="", avatar="")
        for chunk in chunks(ids, SMALL):
            for pk in profiles.filter(user_id__in=chunk).values_list("user_id", flat=True):
                found.setdefault(pk, []).append(f"{m.profile._meta.db_table} (filled in)")
        return found

    def create_profiles(self):
        """One empty profile per user this sync inserted, in one statement."""
        profile = self.models.profile._meta
        columns = ", ".join(self.qn(profile.get_field(name).column) for name in PROFILE_WRITE)
        self.sql(
            f"INSERT INTO {self.qn(profile.db_table)} ({columns}) "
            f"SELECT id, '', '', %s FROM {VALUES} WHERE action = 'insert'",
            [self.at],
        )

    def advance_sequences(self):
        """The next NewUser id is above every id the legacy table held, rejected rows included."""
        m = self.models
        links = [self.links(m.new, name)[0] for name in LINKS]
        reset_sequences([m.profile, *links], self.alias)
        floor = max(
            self.max_legacy_id, m.new.objects.using(self.alias).aggregate(x=Max("pk"))["x"] or 0
        )
        table = m.new._meta.db_table
        if self.postgresql:
            (sequence,) = self.sql("SELECT pg_get_serial_sequence(%s, 'id')", [table])[0]
            self.sql(
                f"SELECT setval(%s, GREATEST(%s, (SELECT last_value FROM {sequence})))",
                [sequence, floor],
            )
        elif self.connection.vendor == "sqlite":
            # AUTOINCREMENT tables take the next id from sqlite_sequence.
            self.sql(
                "UPDATE sqlite_sequence SET seq = MAX(seq, %s) WHERE name = %s", [floor, table]
            )
            self.sql(
                "INSERT INTO sqlite_sequence (name, seq) SELECT %s, %s "
                "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = %s)",
                [table, floor, table],
            )

    def verify(self):
        """Compare every row this sync wrote with its legacy row; raise (rolling back) on any
        difference. Exact SQL equality for the fields copied as they are, and the rules of
        `email_matches` and `phone_matches` (not the copy's own) in Python for the others."""
        m, qn = self.models, self.qn
        legacy_t, new_t, profile_t = self.table(m.legacy), self.table(m.new), self.table(m.profile)
        every_row = f"n.{self.column(m.new, 'updated_at')} = %s"
        # Driven by the change log, the checks below read only the users it names; this
        # count of every row written shows that no other was.
        this_run = every_row + self.restricted("n.id")
        joined = f"n.{self.column(m.new, 'joined_at')} = %s" + self.restricted("n.id")
        problems = []
        written = self.result.copied + self.result.updated
        (n_written,) = self.sql(f"SELECT COUNT(*) FROM {new_t} n WHERE {every_row}", [self.at])[0]
        if n_written != written:
            problems.append(f"{n_written} new users written, {written} expected")
        if self.only:
            (n_named,) = self.sql(f"SELECT COUNT(*) FROM {new_t} n WHERE {this_run}", [self.at])[0]
            if n_named != n_written:
                problems.append(
                    f"{n_written - n_named} new users written that the change log does not name"
                )
        (n_profiles,) = self.sql(
            f"SELECT COUNT(*) FROM {profile_t} p JOIN {new_t} n ON n.id = p.user_id WHERE {joined}",
            [self.at],
        )[0]
        if n_profiles != self.result.copied:
            problems.append(f"{n_profiles} profiles for {self.result.copied} inserted users")
        same = "IS NOT DISTINCT FROM" if self.postgresql else "IS"
        exact = " AND ".join(
            f"n.{self.column(m.new, f)} {same} l.{self.column(m.legacy, f)}"
            for f in FIELDS
            if f not in {"id", "email", "phone_number"}
        )
        differ = self.first_ids(
            f"SELECT n.id FROM {new_t} n LEFT JOIN {legacy_t} l ON l.id = n.id "
            f"WHERE {this_run} AND (l.id IS NULL OR NOT ({exact}))",
            [self.at],
        )
        if differ:
            problems.append(f"fields differ from the legacy row for new users {differ}")
        for name in LINKS:
            src, s_user, s_other = self.links(m.legacy, name)
            dst, d_user, d_other = self.links(m.new, name)
            src_t, dst_t = self.table(src), self.table(dst)
            s_user, s_other, d_user, d_other = (qn(c) for c in (s_user, s_other, d_user, d_other))
            missing = self.first_ids(
                f"""SELECT n.id FROM {src_t} s JOIN {new_t} n ON n.id = s.{s_user}
                WHERE {this_run} AND NOT EXISTS (SELECT 1 FROM {dst_t} d
                    WHERE d.{d_user} = s.{s_user} AND d.{d_other} = s.{s_other})""",
                [self.at],
            )
            extra = self.first_ids(
                f"""SELECT n.id FROM {dst_t} d JOIN {new_t} n ON n.id = d.{d_user}
                WHERE {this_run} AND NOT EXISTS (SELECT 1 FROM {src_t} s
                    WHERE s.{s_user} = d.{d_user} AND s.{s_other} = d.{d_other})""",
                [self.at],
            )
            if missing or extra:
                problems.append(f"{name} differ for new users {sorted(set(missing + extra))[:5]}")
        problems += self.verify_emails_and_phones()
        for chunk in chunks(self.deleted_ids, SMALL):
            if left := list(m.new.objects.using(self.alias).filter(pk__in=chunk)[:5]):
                problems.append(f"deleted users still on the new side: {[u.pk for u in left]}")
                break
        if problems:
            raise CopyError(
                "Verification failed, the sync was rolled back and nothing was written: "
                + "; ".join(problems)
            )

    def first_ids(self, sql, params) -> list[int]:
        """The first 5 ids `sql` (selecting n.id) finds. Materialised first on PostgreSQL: with
        the LIMIT inside, it plans a million index lookups in id order, not one join."""
        materialized = "MATERIALIZED" if self.postgresql else ""
        return [
            r[0]
            for r in self.sql(
                f"WITH found AS {materialized} ({sql}) SELECT id FROM found ORDER BY id LIMIT 5",
                params,
            )
        ]

    def verify_emails_and_phones(self) -> list[str]:
        """Stream the written rows (a server-side cursor on PostgreSQL: memory stays flat)."""
        m = self.models
        email_n, email_l = self.column(m.new, "email"), self.column(m.legacy, "email")
        phone_n, phone_l = self.column(m.new, "phone_number"), self.column(m.legacy, "phone_number")
        bad_emails, bad_phones = [], []
        with self.connection.chunked_cursor() as cursor:
            cursor.execute(
                f"SELECT n.id, n.{email_n}, l.{email_l}, n.{phone_n}, l.{phone_l} "
                f"FROM {self.table(m.new)} n JOIN {self.table(m.legacy)} l ON l.id = n.id "
                f"WHERE n.{self.column(m.new, 'updated_at')} = %s{self.restricted('n.id')}",
                [self.at],
            )
            while rows := cursor.fetchmany(self.batch_size):
                for pk, email, old_email, phone, old_phone in rows:
                    if len(bad_emails) < 5 and not email_matches(old_email, email):
                        bad_emails.append(pk)
                    if len(bad_phones) < 5 and not phone_matches(old_phone, phone):
                        bad_phones.append(pk)
        return [
            f"{what} differ for new users {sorted(ids)}"
            for what, ids in (("emails", bad_emails), ("phone numbers", bad_phones))
            if ids
        ]

    def record(self):
        """Write the digests of every user this sync wrote: the next sync compares with them.

        The legacy digest is the one the plan computed from the snapshot."""
        m = self.models
        new_joins, new_digest = self.digest(m.new, "n", correlated=bool(self.only))
        state_t, new_t = self.table(m.state), self.table(m.new)
        this_run = f"n.{self.column(m.new, 'updated_at')} = %s" + self.restricted("n.id")
        # The digests first, by CREATE TABLE AS: PostgreSQL computes them in parallel workers
        # (an INSERT ... SELECT, or a query reading a temporary table, runs in one process).
        self.sql(
            f"CREATE TEMP TABLE {DIGESTS} {'ON COMMIT DROP' if self.postgresql else ''} AS "
            f"SELECT n.id, {new_digest} AS digest FROM {new_t} n {new_joins} WHERE {this_run}",
            [self.at],
        )
        # Every user written is planned (DIGESTS is in PLAN): one upsert replaces their rows.
        # (`WHERE true`: SQLite's parser needs it before ON CONFLICT after a join.)
        self.sql(
            f"""INSERT INTO {state_t} (user_id, legacy_digest, new_digest, synced_at)
            SELECT d.id, p.legacy_digest, d.digest, %s
            FROM {DIGESTS} d JOIN {PLAN} p ON p.id = d.id WHERE true
            ON CONFLICT (user_id) DO UPDATE SET legacy_digest = excluded.legacy_digest,
                new_digest = excluded.new_digest, synced_at = excluded.synced_at""",
            [self.at],
        )

    def log(self, *, ok, message):
        """Record the run for the status page when it wrote something or failed (not dry runs).

        A failure is recorded after its transaction (or, inside a caller's transaction, its
        savepoint) was rolled back, so the record is not rolled back with it.
        """
        if not self.recorded:
            return
        if self.models.log is None or self.dry_run or (ok and not self.result.written):
            return
        try:
            self.models.log.objects.using(self.alias).create(
                kind="copy",
                ok=ok,
                started_at=self.started_at,
                summary=self.result.summary(),
                message=message,
            )
        except DatabaseError:
            if ok:
                raise
            # The database itself failed (down, say): the error message is what is left.


def link_table(model, name):
    """The m2m table of `model.<name>` (groups, user_permissions) and its two columns."""
    m2m = model._meta.get_field(name)
    return m2m.remote_field.through, m2m.m2m_column_name(), m2m.m2m_reverse_name()


def chunks(items, size=SMALL):
    """Lists of at most `size` items: for IN (...) lists below SQLite's 999 parameters."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def mark_in_sync(models: CopyModels, *, alias: str = "default", exclude=(), only: str = "") -> int:
    """Record both sides as synced as they are now (after a rollback made them equal).

    `only`: a table with an `id` column; only those users are recorded again (the rollback
    passes the users it looked at; every other user's record stays as it was). Users in
    `exclude` (a rollback left them out: their two sides differ) are recorded with digests
    that match nothing on either side, so the next sync reports them as conflicts (both sides
    changed) instead of taking the two sides for equal.
    """
    sync = Sync(models, alias, False, False, 0, None, None)
    m = models
    legacy_joins, legacy_digest = sync.digest(m.legacy, "l", correlated=bool(only))
    new_joins, new_digest = sync.digest(m.new, "n", correlated=bool(only))
    state_t = sync.table(m.state)
    with transaction.atomic(using=alias):
        sync.utc()
        if only:
            sync.sql(f"DELETE FROM {state_t} WHERE user_id IN (SELECT id FROM {only})")
        else:
            sync.sql(f"DELETE FROM {state_t}")
        sync.sql(
            f"""INSERT INTO {state_t} (user_id, legacy_digest, new_digest, synced_at)
            SELECT n.id, {legacy_digest}, {new_digest}, %s
            FROM {sync.table(m.new)} n JOIN {sync.table(m.legacy)} l ON l.id = n.id
            {legacy_joins} {new_joins}
            {f"WHERE n.id IN (SELECT id FROM {only})" if only else ""}""",
            [sync.at],
        )
        for chunk in chunks(sorted(exclude), SMALL):
            m.state.objects.using(alias).filter(pk__in=chunk).update(
                legacy_digest=NO_DIGEST, new_digest=NO_DIGEST
            )
        return m.state.objects.using(alias).count()


def uncopy_users(models: CopyModels, *, alias: str = "default") -> int:
    """Undo the copy: delete the new users, profiles, links and sync state; refuse if anything
    on the new side differs from what the sync wrote.

    A new user without sync state (a signup), one whose digest differs from the one the last
    sync recorded (any write: save, update(), update_fields, links), a filled-in profile, or a
    row in any other table pointing at NewUser (addresses, the admin log, ...) means the new
    schema is in use: deleting it would lose data, so nothing is deleted.
    """
    if readonly.is_read_only(models.legacy, alias):
        raise CopyError(
            "Refusing to undo the user copy: the cut-over is done and NewUser is the live user "
            "table; undoing the copy would delete every user. Go back with `make "
            "cutover-rollback` (AUTH_USER_MODEL=account.User) first."
        )
    sync = Sync(models, alias, False, False, 0, None, None)
    m, qn = models, sync.qn
    own = [sync.links(m.new, name)[0]._meta.db_table for name in LINKS]
    own.append(m.profile._meta.db_table)
    new_table = m.new._meta.db_table
    others = sorted(
        {fk.table for fk in catalog.foreign_keys_to(new_table, using=alias, exclude=own)}
    )
    _, new_digest = sync.digest(m.new, "n", correlated=True)
    # `migrate account 0001` reverses 0004 first, which records the digests by ids again: a
    # row matching either formula is as the sync left it (the ids' one is read only if the
    # natural keys' one differs).
    _, by_ids = sync.digest(m.new, "n", correlated=True, keys="ids")
    changed = (
        f"CASE WHEN {new_digest} = s.new_digest THEN 0 "
        f"WHEN {by_ids} = s.new_digest THEN 0 ELSE 1 END = 1"
    )
    new_t, state_t = sync.table(m.new), sync.table(m.state)
    with transaction.atomic(using=alias):
        sync.utc()
        if sync.postgresql:
            # Nobody writes to these tables between the checks and the delete.
            tables = ", ".join([qn(new_table), *map(qn, own), *others, qn(m.state._meta.db_table)])
            sync.sql(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
        reasons = []
        for what, sql in (
            (
                "new users were not made by the copy (signups)",
                f"SELECT n.id FROM {new_t} n WHERE NOT EXISTS "
                f"(SELECT 1 FROM {state_t} s WHERE s.user_id = n.id)",
            ),
            (
                "copied users were changed on the new side since the last sync",
                f"SELECT n.id FROM {new_t} n JOIN {state_t} s ON s.user_id = n.id WHERE {changed}",
            ),
        ):
            ids = [r[0] for r in sync.sql(sql + " ORDER BY n.id")]
            if ids:
                reasons.append(f"{len(ids)} {what} (ids {ids[:5]})")
        if n := m.profile.objects.using(alias).exclude(bio="", avatar="").count():
            reasons.append(f"{n} profiles were filled in after the copy")
        for table in others:
            if n := sync.sql(f"SELECT COUNT(*) FROM {catalog.sql_name(table, alias)}")[0][0]:
                reasons.append(f"{n} rows in {table}")
        if reasons:
            raise CopyError(
                "Refusing to undo the user copy: the new tables hold data the copy did not "
                f"write ({'; '.join(reasons)}). Going back would delete it. To go back anyway, "
                "take a backup first (make backup), delete or undo those changes yourself, "
                "then run `python manage.py migrate account 0001` again."
            )
        deleted = m.new.objects.using(alias).count()
        if sync.postgresql:
            sync.sql("SELECT set_config(%s, 'on', true)", [readonly.WRITER_SETTING])
            # TRUNCATE skips a million foreign key checks; the other tables are empty (checked).
            sync.sql(f"TRUNCATE {tables}")
        else:
            with readonly.engine_writes(alias):
                for table in [*own, new_table, m.state._meta.db_table]:
                    sync.sql(f"DELETE FROM {qn(table)}")
    return deleted
