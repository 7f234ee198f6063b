"""Copy legacy users into NewUser + Profile: the one engine behind migration 0002 and the commands.

Every function takes the model classes as arguments, so the data migration passes historical
models (`apps.get_model`) and the commands pass the real ones.

What one copy does, inside one transaction (see the README for the rules and the policy):

1. takes a lock, so a second copy started meanwhile refuses (PostgreSQL) or waits (SQLite);
2. finds the rows the new schema cannot take in SQL: emails shared by several legacy users
   (compared as LOWER(TRIM(email)), the way the new unique index compares them), emails
   already used by a new user, ids already taken by a different new user;
3. streams the legacy users not yet copied, in id order and in batches, normalises each row
   (`account.normalize`) and writes users, groups and permissions per batch; then one
   INSERT ... SELECT gives each copied user an empty profile;
4. by default writes nothing at all when a row was rejected; with `skip_invalid` it copies
   every valid row and leaves the others in the legacy table; the report lists each rejection;
5. resets the id sequences, then verifies what it wrote against the legacy table, field by
   field, and rolls everything back on any difference.
"""

import csv
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from django.core.management.base import CommandError
from django.db import IntegrityError, connections, transaction
from django.db.models import Count, Exists, F, Max, OuterRef, Subquery
from django.db.models.functions import Lower, Trim
from django.utils import timezone

from .dbutil import analyze, indexes_built_after, insert_rows, reset_sequences
from .normalize import Rejected, check_username, normalize_email, normalize_phone

# Legacy columns read, and the NewUser columns written, in the same order.
READ = (
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
WRITE = (*READ, "joined_at", "updated_at")
PROFILE_WRITE = ("user_id", "bio", "avatar", "updated_at")
LOCK_KEY = 727_001  # pg advisory lock id of the user copy
REPORT_FIELDS = ("legacy_id", "username", "reason", "detail")


class CopyError(CommandError):
    """The copy refused or failed; nothing was written. The message says what to do."""


@dataclass
class CopyModels:
    """The models the copy reads and writes (historical ones in a migration)."""

    legacy: type
    new: type
    profile: type
    log: type | None = None

    @classmethod
    def from_apps(cls, apps):
        return cls(
            legacy=apps.get_model("account", "User"),
            new=apps.get_model("account", "NewUser"),
            profile=apps.get_model("account", "Profile"),
            log=apps.get_model("account", "OperationLog"),
        )


@dataclass
class CopyResult:
    """What a copy (or a dry run of it) did; counts only, no personal data."""

    dry_run: bool = False
    pending: int = 0
    copied: int = 0
    already_copied: int = 0
    groups: int = 0
    permissions: int = 0
    rejected: Counter = field(default_factory=Counter)
    normalised: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    report: Path | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> dict:
        return {
            "pending": self.pending,
            "copied": self.copied,
            "already_copied": self.already_copied,
            "groups": self.groups,
            "permissions": self.permissions,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "normalised_by_kind": dict(sorted(self.normalised.items())),
            "seconds": round(self.seconds, 2),
            "report": self.report.name if self.report else None,
        }

    def lines(self) -> list[str]:
        verb = "would copy" if self.dry_run else "copied"
        out = [
            f"{self.pending} legacy users not yet copied, {self.already_copied} copied before; "
            f"{verb} {self.copied} "
            f"(with {self.groups} group and {self.permissions} permission links) "
            f"in {self.seconds:.1f} s."
        ]
        for reason, n in sorted(self.rejected.items()):
            out.append(f"  rejected, {reason}: {n}")
        for kind, n in sorted(self.normalised.items()):
            out.append(f"  normalised, {kind}: {n}")
        if self.report:
            out.append(f"  report: {self.report}")
        return out


class Report:
    """Rejected rows, one CSV line each, written as they are found (never held in memory)."""

    def __init__(self, report_dir, kind: str):
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        # The process id keeps two copies started in the same microsecond apart.
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


def _through(model, name):
    """The auto-created m2m table of `model.<name>` and its two columns (also their attnames)."""
    m2m = model._meta.get_field(name)
    return m2m.remote_field.through, m2m.m2m_column_name(), m2m.m2m_reverse_name()


def _known_bad_rows(models: CopyModels, pending, alias) -> dict[int, tuple[str, str]]:
    """Rows rejected for what only the whole table shows: shared emails, ids and emails taken."""
    bad: dict[int, tuple[str, str]] = {}
    new = models.new.objects.using(alias)
    # Ids already used by a new user with another username: an error, never an overwrite.
    clash = (
        models.legacy.objects.using(alias)
        .filter(Exists(new.filter(pk=OuterRef("pk")).exclude(username=OuterRef("username"))))
        .values_list("pk", "username")
    )
    for pk, username in clash:
        bad[pk] = ("id_taken", f"id {pk} already belongs to a new user other than {username!r}")

    keyed = pending.annotate(key=Lower(Trim("email"))).exclude(key="")
    shared = keyed.values("key").annotate(n=Count("pk")).filter(n__gt=1).values("key")
    group: list[int] = []
    last_key = None

    def flush():
        ids = ", ".join(map(str, group))
        for pk in group:
            bad[pk] = ("email_duplicate", f"legacy users {ids} share this email (any case)")

    # One cheap pass to learn whether any email is shared; the ids only when some are.
    any_shared = shared.exists()
    for pk, key in (
        keyed.filter(key__in=Subquery(shared)).order_by("key", "pk").values_list("pk", "key")
        if any_shared
        else ()
    ):
        if key != last_key and group:
            flush()
            group = []
        group.append(pk)
        last_key = key
    if group:
        flush()

    if new.exists():
        taken_by = new.annotate(k=Lower("email")).filter(k=OuterRef("key")).values("pk")[:1]
        for pk, other in (
            keyed.annotate(other=Subquery(taken_by))
            .filter(other__isnull=False)
            .values_list("pk", "other")
        ):
            bad.setdefault(pk, ("email_taken", f"email already used by new user {other}"))
    return bad


def _lock(alias):
    """Refuse a second copy while one runs (PostgreSQL); SQLite queues writers by itself."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        # Group a million emails in memory, not on disk (this transaction only).
        cursor.execute("SET LOCAL work_mem = '64MB'")
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY])
        if not cursor.fetchone()[0]:
            raise CopyError(
                "Another user copy is running on this database; wait for it to finish, "
                "then run again (it will copy only what is still missing)."
            )


def copy_users(
    models: CopyModels,
    *,
    alias: str = "default",
    skip_invalid: bool = False,
    dry_run: bool = False,
    batch_size: int = 20_000,
    report_dir,
    on_progress=None,
    on_start=None,
) -> CopyResult:
    """Copy every legacy user not yet in NewUser; see the module docstring for the steps."""
    started, started_at = time.perf_counter(), timezone.now()
    result = CopyResult(dry_run=dry_run)
    report = Report(report_dir, "check" if dry_run else "copy")
    result.report = report.path
    try:
        # dry_run writes nothing, but still reads in one transaction for a consistent view.
        with transaction.atomic(using=alias):
            if not dry_run:
                _lock(alias)
            _copy(
                models,
                alias,
                skip_invalid,
                dry_run,
                batch_size,
                report,
                result,
                on_progress,
                on_start,
            )
            result.seconds = time.perf_counter() - started
            if result.rejected_total and not skip_invalid and not dry_run:
                raise CopyError(_refusal(result))
    except IntegrityError as exc:
        # The checks above make this unreachable unless another process wrote meanwhile.
        first_line = (str(exc).strip().splitlines() or ["integrity error"])[0]
        raise CopyError(
            f"The database refused the copy ({first_line}); nothing was written. Another "
            "process may have written to the user tables meanwhile: run the copy again."
        ) from None
    except CopyError as exc:
        _log(models, alias, result, started_at, ok=False, message=str(exc))
        raise
    finally:
        report.close()
        if not result.rejected_total:
            result.report.unlink()
            result.report = None
    _log(models, alias, result, started_at, ok=True, message=result.lines()[0])
    return result


def _refusal(result: CopyResult) -> str:
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(result.rejected.items()))
    return (
        f"{result.rejected_total} legacy users cannot be copied as they are ({reasons}); "
        f"nothing was written. Every row is listed in {result.report}. Either fix those rows "
        "in the legacy table and run again, or copy the valid rows and leave these behind "
        "with USER_COPY_SKIP_INVALID=on (make migrate-data SKIP_INVALID=1)."
    )


def _copy(models, alias, skip_invalid, dry_run, batch_size, report, result, on_progress, on_start):
    legacy = models.legacy.objects.using(alias)
    new = models.new.objects.using(alias)
    copied_before = Exists(new.filter(pk=OuterRef("pk"), username=OuterRef("username")))
    pending = legacy.exclude(Exists(new.filter(pk=OuterRef("pk"))))
    result.already_copied = legacy.filter(copied_before).count()
    result.pending = legacy.exclude(copied_before).count()
    if on_start:
        on_start(result.pending)
    if not result.pending:
        return
    analyze([models.legacy], alias)
    bad = _known_bad_rows(models, pending, alias)
    # Ids taken by another new user are not in `pending` (that excludes every id in NewUser).
    for pk, (reason, detail) in bad.items():
        if reason == "id_taken":
            report.add(pk, "", reason, detail)
            result.rejected[reason] += 1

    copy_time = timezone.now()
    # Formatted once: dumping a datetime per row for COPY costs more than the string.
    stamp = copy_time.isoformat() if connections[alias].vendor == "postgresql" else copy_time

    # The first copy loads into empty tables: on PostgreSQL, build their indexes afterwards.
    first_load = (
        not dry_run and not new.exists() and not models.profile.objects.using(alias).exists()
    )
    bulk = indexes_built_after([models.new, models.profile], alias) if first_load else nullcontext()
    with bulk:
        # Users added while this copy runs (higher ids) are left to the next re-sync.
        last_id, max_id = 0, legacy.aggregate(m=Max("pk"))["m"]
        while True:
            rows = list(
                legacy.filter(pk__gt=last_id, pk__lte=max_id)
                .order_by("pk")
                .values_list(*READ)[:batch_size]
            )
            if not rows:
                break
            last_id = rows[-1][0]
            # Users copied before (or ids taken by another new user) in this id range are skipped.
            done = set(new.filter(pk__gte=rows[0][0], pk__lte=last_id).values_list("pk", flat=True))
            users = []
            for row in rows:
                pk, username = row[0], row[4]
                if pk in done:
                    continue
                try:
                    if pk in bad:
                        raise Rejected(*bad[pk])
                    check_username(username)
                    email, email_change = normalize_email(row[5])
                    phone, phone_change = normalize_phone(row[8])
                except Rejected as rejected:
                    report.add(pk, username, rejected.reason, rejected.detail)
                    result.rejected[rejected.reason] += 1
                    continue
                if email_change:
                    result.normalised[email_change] += 1
                if phone_change:
                    result.normalised[phone_change] += 1
                users.append(
                    (*row[:5], email, row[6], row[7], phone, row[9], row[10], stamp, stamp)
                )
            result.copied += len(users)
            # Once a row is rejected under the default policy, nothing will be kept: only classify.
            writing = not dry_run and (skip_invalid or not result.rejected_total)
            if writing and users:
                insert_rows(models.new, WRITE, users, alias)
                ids = {u[0] for u in users}
                result.groups += _copy_links(models, "groups", ids, alias)
                result.permissions += _copy_links(models, "user_permissions", ids, alias)
            if on_progress:
                on_progress(len(rows) - len(done))

        if dry_run or not result.copied or (result.rejected_total and not skip_invalid):
            return
        _create_profiles(models, alias, copy_time)
    links = [_through(models.new, name)[0] for name in ("groups", "user_permissions")]
    reset_sequences([models.new, models.profile, *links], alias)
    # Fresh statistics, or the planner takes the new tables for empty and verifies slowly.
    analyze([models.new, models.profile, *links], alias)
    _verify(models, alias, copy_time, result)


def _create_profiles(models, alias, copy_time):
    """One empty profile per user this copy wrote (they carry its copy time), in one statement."""
    connection = connections[alias]
    qn = connection.ops.quote_name
    profile = models.profile._meta
    columns = ", ".join(qn(profile.get_field(name).column) for name in PROFILE_WRITE)
    at = connection.ops.adapt_datetimefield_value(copy_time)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {qn(profile.db_table)} ({columns}) "
            f"SELECT id, '', '', joined_at FROM {qn(models.new._meta.db_table)} "
            "WHERE joined_at = %s AND updated_at = %s",
            [at, at],
        )


def _copy_links(models, name, ids, alias) -> int:
    """Copy the `name` links (groups or user_permissions) of the users in `ids` (one batch)."""
    src, src_user, src_other = _through(models.legacy, name)
    dst, dst_user, dst_other = _through(models.new, name)
    lo, hi = min(ids), max(ids)
    links = [
        (user_id, other)
        for user_id, other in src.objects.using(alias)
        .filter(**{f"{src_user}__gte": lo, f"{src_user}__lte": hi})
        .values_list(src_user, src_other)
        if user_id in ids
    ]
    if links:
        insert_rows(dst, (dst_user, dst_other), links, alias)
    return len(links)


def _verify(models, alias, copy_time, result):
    """Compare what this copy wrote with the legacy rows; raise (rolling back) on any difference."""
    connection = connections[alias]
    qn = connection.ops.quote_name
    same = "IS NOT DISTINCT FROM" if connection.vendor == "postgresql" else "IS"
    legacy_t, new_t = qn(models.legacy._meta.db_table), qn(models.new._meta.db_table)
    profile_t = qn(models.profile._meta.db_table)
    problems = []

    def scalar(sql, params=()):
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

    def first_ids(sql, params=()):
        with connection.cursor() as cursor:
            cursor.execute(sql + " ORDER BY n.id LIMIT 5", params)
            return [r[0] for r in cursor.fetchall()]

    this_run = "n.joined_at = %s AND n.updated_at = %s"
    at = connection.ops.adapt_datetimefield_value(copy_time)  # as the ORM stores it
    params = [at, at]
    n_users = scalar(f"SELECT COUNT(*) FROM {new_t} n WHERE {this_run}", params)
    if n_users != result.copied:
        problems.append(f"{n_users} new users written, {result.copied} expected")
    n_profiles = scalar(
        f"SELECT COUNT(*) FROM {profile_t} p JOIN {new_t} n ON n.id = p.user_id WHERE {this_run}",
        params,
    )
    if n_profiles != result.copied:
        problems.append(f"{n_profiles} profiles for {result.copied} copied users")
    differ = first_ids(
        f"""SELECT n.id FROM {new_t} n LEFT JOIN {legacy_t} l ON l.id = n.id
        WHERE {this_run} AND (l.id IS NULL OR NOT (
            n.username = l.username AND n.password = l.password AND n.full_name = l.full_name
            AND n.is_active = l.is_active AND n.is_staff = l.is_staff
            AND n.is_superuser = l.is_superuser
            AND n.date_of_birth {same} l.date_of_birth AND n.last_login {same} l.last_login
            AND LOWER(n.email) = LOWER(TRIM(l.email))
            AND (n.phone_number = '') = (TRIM(l.phone_number) = '')))""",
        params,
    )
    if differ:
        problems.append(f"fields differ from the legacy row for new users {differ}")
    for name in ("groups", "user_permissions"):
        src, s_user, s_other = _through(models.legacy, name)
        dst, d_user, d_other = _through(models.new, name)
        src_t, dst_t = qn(src._meta.db_table), qn(dst._meta.db_table)
        s_user, s_other, d_user, d_other = (qn(c) for c in (s_user, s_other, d_user, d_other))
        missing = first_ids(
            f"""SELECT n.id FROM {src_t} s JOIN {new_t} n ON n.id = s.{s_user}
            WHERE {this_run} AND NOT EXISTS (SELECT 1 FROM {dst_t} d
                WHERE d.{d_user} = s.{s_user} AND d.{d_other} = s.{s_other})""",
            params,
        )
        extra = first_ids(
            f"""SELECT n.id FROM {dst_t} d JOIN {new_t} n ON n.id = d.{d_user}
            WHERE {this_run} AND NOT EXISTS (SELECT 1 FROM {src_t} s
                WHERE s.{s_user} = d.{d_user} AND s.{s_other} = d.{d_other})""",
            params,
        )
        if missing or extra:
            problems.append(f"{name} differ for new users {sorted(set(missing + extra))[:5]}")
    problems += _verify_phones(models, alias, copy_time)
    if problems:
        raise CopyError(
            "Verification failed, the copy was rolled back and nothing was written: "
            + "; ".join(problems)
        )


def _verify_phones(models, alias, copy_time) -> list[str]:
    """Phones are reformatted, so compare each stored value with the rule applied again."""
    connection = connections[alias]
    qn = connection.ops.quote_name
    wrong = []
    # A server-side cursor on PostgreSQL: one join, streamed, memory flat.
    with connection.chunked_cursor() as cursor:
        cursor.execute(
            f"SELECT n.id, n.phone_number, l.phone_number FROM {qn(models.new._meta.db_table)} n "
            f"JOIN {qn(models.legacy._meta.db_table)} l ON l.id = n.id "
            "WHERE n.joined_at = %s AND n.updated_at = %s",
            [connection.ops.adapt_datetimefield_value(copy_time)] * 2,
        )
        while rows := cursor.fetchmany(20_000):
            for pk, phone, old in rows:
                if normalize_phone(old)[0] != phone and len(wrong) < 5:
                    wrong.append(pk)
    return [f"phone numbers differ for new users {sorted(wrong)}"] if wrong else []


def _log(models, alias, result, started_at, *, ok, message):
    """Record the run for the status page (counts only), unless it was a dry run or a no-op."""
    if models.log is None or result.dry_run or not result.pending:
        return
    models.log.objects.using(alias).create(
        kind="copy", ok=ok, started_at=started_at, summary=result.summary(), message=message
    )


def _tables_referencing(table, alias) -> list[str]:
    """Every table with a foreign key to `table` (admin log, addresses, profiles, ...)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        return sorted(
            other
            for other in connection.introspection.table_names(cursor)
            if any(
                ref_table == table
                for _, ref_table in connection.introspection.get_relations(cursor, other).values()
            )
        )


def uncopy_users(models: CopyModels, *, alias: str = "default") -> int:
    """Undo the copy: delete the new users, profiles and links; refuse if anything else is there.

    Rows in any other table that points at NewUser (addresses, activity, notifications, the
    admin log, ...) and new users the copy did not make or that changed since mean the new
    schema is in use: deleting them would lose data, so nothing is deleted.
    """
    connection = connections[alias]
    qn = connection.ops.quote_name
    legacy = models.legacy.objects.using(alias)
    new = models.new.objects.using(alias)
    copy_tables = [
        _through(models.new, "groups")[0]._meta.db_table,
        _through(models.new, "user_permissions")[0]._meta.db_table,
        models.profile._meta.db_table,
    ]
    new_table = models.new._meta.db_table
    others = [t for t in _tables_referencing(new_table, alias) if t not in copy_tables]
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Nobody writes to these tables between the checks and the delete.
            tables = ", ".join(qn(t) for t in [new_table, *copy_tables, *others])
            cursor.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
        reasons = []
        not_copied = new.exclude(
            Exists(legacy.filter(pk=OuterRef("pk"), username=OuterRef("username")))
        )
        if n := not_copied.count():
            ids = list(not_copied.order_by("pk").values_list("pk", flat=True)[:5])
            reasons.append(f"{n} new users were not copied from the legacy table (ids {ids})")
        if n := new.exclude(updated_at=F("joined_at")).count():
            reasons.append(f"{n} copied users were changed after the copy")
        if n := models.profile.objects.using(alias).exclude(bio="", avatar="").count():
            reasons.append(f"{n} profiles were filled in after the copy")
        for table in others:
            cursor.execute(f"SELECT COUNT(*) FROM {qn(table)}")
            if n := cursor.fetchone()[0]:
                reasons.append(f"{n} rows in {table}")
        if reasons:
            raise CopyError(
                "Refusing to undo the user copy: the new tables hold data the copy did not "
                f"create ({'; '.join(reasons)}). Going back would delete it. To go back anyway, "
                "take a backup first (make backup), delete those rows yourself, then run "
                "`python manage.py migrate account 0001` again."
            )
        deleted = new.count()
        if connection.vendor == "postgresql":
            # TRUNCATE skips a million foreign key checks; the other tables are empty (checked).
            cursor.execute(f"TRUNCATE {tables}")
        else:
            for table in [*copy_tables, new_table]:
                cursor.execute(f"DELETE FROM {qn(table)}")
    return deleted
