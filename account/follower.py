"""`copy_users --follow`: carry each legacy write into NewUser as it commits (PostgreSQL).

The capture triggers (`account.changecapture`) append every legacy write to the change log,
and a statement trigger on the log sends a `NOTIFY` on `CHANNEL` when the writer commits
(migration 0007). The follower:

1. takes a session advisory lock (`FOLLOW_KEY`): a second follower refuses in one line;
2. `LISTEN`s on the channel and runs one sync at once (what was written while no follower ran);
3. waits for a notification, then runs a sync, which reads the log in its snapshot, carries
   exactly the users it names and deletes exactly the rows it read, in the same transaction as
   its writes. The log's position therefore commits with the writes: a follower killed at any
   moment (`kill -9`) leaves the log rows of whatever it had not committed, and the next sync
   carries them;
4. also syncs every `heartbeat` seconds when the log is not empty (a notification is only a
   hint: one sent while the connection was being re-made, or by this follower's own
   'pending' rows, which it ignores, is not needed for correctness). This is also how a
   refused sync is tried again: what made it refuse can pass without a legacy write (another
   sync finished, a row referencing a deleted user was removed). With a capture trigger or
   the DDL watch missing or disabled, a write may be neither logged nor notified: each
   heartbeat then compares every user. A heartbeat whose sync compared every user and
   changed nothing doubles the wait before the next one (`Backoff`, up to 12 heartbeats); a
   note from a writer, a sync that wrote, or a heartbeat with nothing to do resets it. Each
   heartbeat also looks for unapplied migrations (migrated back, it waits as below);
5. on SIGTERM or SIGINT (Ctrl-C) finishes the sync in hand and returns.

A sync that refuses (a rejected row under the default policy, a conflict, another sync
running) is reported once, not once per write, and retried at the next change or heartbeat.
While there is nothing to follow (migrations not applied yet, so no first copy; or cut over)
it says so once and looks again every `heartbeat` seconds: as a service it never exits on its
own. Its run is one OperationLog row (`Run`), for the status page.
"""

import re
import signal
import threading
import time
from collections.abc import Callable
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psycopg
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from . import changecapture, readonly
from .usercopy import CopyError, CopyResult, copy_users

CHANNEL = changecapture.CHANNEL
REPORT = re.compile(r"\S+\.csv")  # a report's path, in a refusal
FOLLOW_KEY = 727_002  # pg advisory lock id of the follower (the sync's own is 727_001)


@dataclass
class Followed:
    """What a follower did, for its last line and for OperationLog."""

    syncs: int = 0
    copied: int = 0
    updated: int = 0
    deleted: int = 0
    refused: int = 0
    stopped_by: str = ""


class FollowError(CopyError):
    pass


class CutOver(Exception):
    """Nothing to follow any more (cut over, or migrated back): `idle_reason` says why."""


@contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM and SIGINT set `stop` instead of interrupting the sync in hand."""
    caught = (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread; the caller sets `stop` itself
        return
    previous = {s: signal.getsignal(s) for s in caught}

    def handler(signum, frame):
        stop.signal_name = signal.Signals(signum).name
        stop.set()

    for s in caught:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def follow(
    models,
    *,
    using: str = "default",
    skip_invalid: bool,
    batch_size: int,
    report_dir,
    heartbeat: float = 5.0,
    stop: threading.Event | None = None,
    on_sync: Callable[[CopyResult], None] | None = None,
    on_refused: Callable[[str], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    on_idle: Callable[[str], None] | None = None,
    alive_file: Path | None = None,
) -> Followed:
    """Follow the change log until `stop` is set (or a signal sets it); see the module.
    `alive_file`: touched at least every `heartbeat` seconds while it waits, and after each
    sync (a container's healthcheck reads its age: a follower stuck somewhere stops touching
    it)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        raise FollowError(
            "--follow needs PostgreSQL (its change log and LISTEN/NOTIFY); on SQLite run "
            "`copy_users` when you want NewUser brought up to date."
        )
    if connection.in_atomic_block:
        raise FollowError("--follow cannot run inside a transaction.")
    stop = stop or threading.Event()
    done = Followed()
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [FOLLOW_KEY])
        if not cursor.fetchone()[0]:
            holder = follower_pid(cursor)
            raise FollowError(
                "Another follower is running on this database"
                + (f" (database backend pid {holder})" if holder else "")
                + ": one at a time. Stop it first (SIGTERM), or let it carry the changes."
            )
        cursor.execute(f"LISTEN {CHANNEL}")
        cursor.execute("SELECT pg_backend_pid()")
        own_pid = cursor.fetchone()[0]
    run = Run(models, using, every=heartbeat)
    with suppress(DatabaseError):  # not migrated yet: done when its own row is made
        run.close_dead_runs()
    last_refusal = None
    announced = None  # the report a refusal named: kept while the refusal stands
    # Its reports apart (one folder per database: followers of other databases clean up
    # their own), the newest only: a rejected row still pending would otherwise leave a file
    # per sync.
    reports = Path(report_dir) / "follower" / str(connection.settings_dict["NAME"])

    def same_connection():
        """Django reconnects by itself after a lost connection; the new one would hold
        neither the follower's lock nor its LISTEN."""
        raw = connection.connection
        if raw is None or raw.closed or raw.info.backend_pid != own_pid:
            raise FollowError(
                "The follower lost its database connection (and with it its lock and its "
                "LISTEN); it stopped. What it had not committed is still in the change log: "
                "start it again."
            )

    def sync_once():
        nonlocal last_refusal, announced
        try:
            result = copy_users(
                models,
                alias=using,
                skip_invalid=skip_invalid,
                batch_size=batch_size,
                report_dir=reports,
                record=False,
            )
        except CopyError as exc:
            same_connection()
            if readonly_now(models, using):
                raise CutOver from None
            done.refused += 1
            found = getattr(exc, "result", None)
            # Once, not once per write: the same refusal names a new report each time.
            if REPORT.sub("", str(exc)) != last_refusal:
                last_refusal = REPORT.sub("", str(exc))
                named = REPORT.search(str(exc))
                announced = Path(named.group()) if named else None
                run.save(done, ok=False, message=str(exc), result=found)
                if on_refused:
                    on_refused(str(exc))
            keep_newest(reports, keep=announced)
            return compared_every_user(found)
        same_connection()
        recovered = last_refusal is not None
        announced = None
        last_refusal = None
        done.syncs += 1
        done.copied += result.copied
        done.updated += result.updated
        done.deleted += result.deleted
        news = recovered or run.rejected != result.rejected_total  # saved at once
        if result.written or news:
            run.save(done, ok=True, message=running_line(done, result), result=result, urgent=news)
        keep_newest(reports, keep=run.report(reports))  # and the one the status page names
        if on_sync:
            on_sync(result)
        return compared_every_user(result) and not result.written

    try:
        with stop_on_signals(stop):
            started = False
            while not stop.is_set():
                touch(alive_file)
                reason = idle_reason(models, using)
                if reason:  # not migrated yet, or cut over: look again every few seconds
                    if reason != last_refusal and on_idle:
                        on_idle(reason)
                    last_refusal = reason
                    run.flush()
                    stop.wait(heartbeat)
                    drain(connection)  # what was notified meanwhile is not for us
                    continue
                try:
                    sync_once()
                    if not started and on_ready:
                        on_ready()
                    started = True
                    carry(
                        sync_once, stop, connection, own_pid, heartbeat, models, using,
                        alive_file, run,
                    )  # fmt: skip
                except CutOver:
                    continue  # idle_reason says so, once
        # Said before the lock is released: a follower starting then would take this row,
        # still 'running', for a dead one's.
        done.stopped_by = getattr(stop, "signal_name", "") or "asked"
        run.stop(done, ok=True, message=summary_line(done))
    except (DatabaseError, psycopg.Error) as exc:
        failure = FollowError(
            f"The database connection failed ({str(exc).strip().splitlines()[0]}); the "
            "follower stopped. What it had not committed is still in the change log: start "
            "it again."
        )
        run.stop(done, ok=False, message=str(failure))
        raise failure from exc
    except BaseException as exc:  # a bug, or FollowError: the run row says it stopped
        run.stop(done, ok=False, message=f"The follower stopped: {exc}"[:2000])
        raise
    finally:
        # A connection that is gone took its lock and its LISTEN with it.
        with suppress(DatabaseError), connection.cursor() as cursor:
            cursor.execute(f"UNLISTEN {CHANNEL}")
            cursor.execute("SELECT pg_advisory_unlock(%s)", [FOLLOW_KEY])
    return done


def carry(sync_once, stop, connection, own_pid, heartbeat, models, using, alive_file, run):
    """Sync at each notification (or heartbeat with work left) until `stop`. Every note
    waiting is read before one sync: a sync carries all that committed before it."""
    waited = time.monotonic()
    backoff = Backoff(heartbeat)
    while not stop.is_set():
        touch(alive_file)
        run.flush()
        # Short waits, so a stop request is seen within half a second. A note sent by this
        # follower's own sync (the 'pending' rows it logs again) wakes nobody. Closed at
        # once: the generator holds the connection's lock until it ends.
        with closing(connection.connection.notifies(timeout=0.5, stop_after=1)) as notes:
            woken = any(note.pid != own_pid for note in notes)
        woken = drain(connection, own_pid) or woken
        if stop.is_set():
            return
        beat = False
        if not woken and time.monotonic() - waited >= backoff.wait:
            if idle_reason(models, using):  # migrated back, or cut over meanwhile
                raise CutOver
            woken = beat = work_left(models, using)
            if not woken:
                backoff.nothing_to_do()
            waited = time.monotonic()
        if woken:
            backoff.synced(beat=beat, idle_full_compare=sync_once())
            waited = time.monotonic()


class Backoff:
    """How long the follower waits between heartbeats: `heartbeat`, doubled after each
    heartbeat whose sync compared every user and changed nothing (capture off, or a refused
    full compare: seconds at a million users), up to `most` heartbeats. A sync woken by a
    writer's note, one that wrote, or a heartbeat with nothing to do sets it back."""

    def __init__(self, heartbeat: float, most: int = 12):
        self.heartbeat, self.most, self.slow = heartbeat, most, 0

    @property
    def wait(self) -> float:
        return self.heartbeat * min(2**self.slow, self.most)

    def synced(self, *, beat: bool, idle_full_compare: bool) -> None:
        self.slow = min(self.slow + 1, self.most.bit_length()) if beat and idle_full_compare else 0

    def nothing_to_do(self) -> None:
        self.slow = 0


def work_left(models, using) -> bool:
    """Rows left in the log (a refused sync, users kept pending: tried again, their cause may
    have passed with no legacy write; cheap, it reads only those users), or a capture trigger
    or the DDL watch missing (a write may not be logged: the sync compares every user, as
    `copy_users` does then; `Backoff` keeps that to about one a minute)."""
    connection = connections[using]
    try:
        return newest_log_id(models, using) is not None or bool(changecapture.missing(connection))
    except DatabaseError:
        if idle_reason(models, using):  # migrated back: the log is gone
            raise CutOver from None
        raise


def compared_every_user(result: CopyResult | None) -> bool:
    return result is not None and result.source == "full" and bool(result.source_reason)


def idle_reason(models, using) -> str:
    """Why there is nothing to follow now, or ''."""
    connection = connections[using]
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if plan:
        names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in plan[:3])
        return (
            f"Waiting for `python manage.py migrate` ({len(plan)} migrations not applied: "
            f"{names}{', ...' if len(plan) > 3 else ''}): the follower starts after the first "
            "copy (make migrate-data)."
        )
    if readonly.is_read_only(models.legacy, using):
        return (
            "The cut-over is done: the legacy table is read-only and there is nothing to "
            "follow. Waiting (for a rollback, or SIGTERM)."
        )
    return ""


def summary_line(done: Followed) -> str:
    return (
        f"Follower stopped ({done.stopped_by}): {done.syncs} syncs, inserted {done.copied}, "
        f"updated {done.updated}, deleted {done.deleted} users"
        + (f"; {done.refused} syncs refused" if done.refused else "")
        + "."
    )


def drain(connection, own_pid=None) -> bool:
    """Read every note already received; whether one came from another backend."""
    with closing(connection.connection.notifies(timeout=0)) as notes:
        return any(note.pid != own_pid for note in notes)


def newest_log_id(models, using):
    changes = models.changes
    return (
        changes.objects.using(using)
        .filter(side=changes.Side.LEGACY)
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )


def touch(path: Path | None) -> None:
    if path is not None:
        with suppress(OSError):  # a healthcheck's file: never a reason to stop following
            path.touch()


def keep_newest(reports: Path, keep: Path | None = None) -> None:
    """Delete this follower's reports but the newest (and `keep`, the one a refusal named)."""
    files = sorted(reports.glob("*.csv"), key=lambda p: p.name)  # named by time
    for old in files[:-1]:
        if old != keep:
            old.unlink(missing_ok=True)


def readonly_now(models, using) -> bool:
    return readonly.is_read_only(models.legacy, using)


def running_line(done: Followed, result: CopyResult) -> str:
    return (
        f"Follower running: {done.syncs} syncs, inserted {done.copied}, updated {done.updated}, "
        f"deleted {done.deleted} users"
        + (
            f"; {result.rejected_total} rejected rows stay ({result.reasons()})"
            if result.rejected_total
            else ""
        )
        + "."
    )


class Run:
    """The follower's one OperationLog row (kind 'copy'), for the status page. Made at its
    first sync that wrote or refused. Saved again at once when a sync refuses or recovers, or
    its rejected rows change, and when the follower stops; a sync that only wrote is saved at
    most once every `every` seconds (`flush`), not at every sync (there can be several a
    second):

    - `finished_at`: the last write, refusal or recovery (not a clean stop: the row would rise
      above a newer copy's on the page); `summary["applied_at"]`: the last sync that wrote
      (the page's "last change applied");
    - `ok` and `message`: the last sync's outcome (a refusal, until a sync succeeds again);
    - `summary`: the run's totals, and the last sync's rejected rows by reason and report
      (the page's chart; that report is kept); `follower`: 'running' or 'stopped'. A killed
      follower cannot say so: the next one to start marks its row stopped, and the page
      believes 'running' only while a backend holds the follower's lock."""

    def __init__(self, models, using, every: float = 5.0):
        self.models, self.using = models, using
        self.every = every  # a sync that only wrote saves the row at most this often
        self.saved = 0.0  # time.monotonic() of the last save
        self.dirty = None  # a save held back (`flush`)
        self.row = None
        self.ok, self.message = True, ""
        self.summary = {"follower": "running"}

    @property
    def rejected(self) -> int:
        """The last sync's rejected rows, as the row says."""
        return self.summary.get("rejected", 0)

    def save(
        self,
        done: Followed,
        *,
        ok,
        message,
        result: CopyResult | None = None,
        urgent: bool = True,
        reconnect: bool = False,
        bump: bool = True,
    ):
        log = self.models.log
        if log is None:
            return
        now = timezone.now()
        held_back = not urgent and ok and self.ok and self.row is not None
        self.ok, self.message = ok, message
        self.summary.update(
            syncs=done.syncs, copied=done.copied, updated=done.updated, deleted=done.deleted,
            refused=done.refused,
        )  # fmt: skip
        if result is not None:
            self.summary.update(
                rejected=result.rejected_total,
                rejected_by_reason=dict(sorted(result.rejected.items())),
                report=result.report.name if result.report else None,
            )
            if ok and result.written:  # a refused sync's counts were rolled back
                self.summary["applied_at"] = now.isoformat()
        if held_back and time.monotonic() - self.saved < self.every:
            self.dirty = now  # only writes since the last save: `flush` saves them
            return
        self.write(now if bump else None, reconnect)

    def flush(self):
        """Save what `save` held back, once `every` seconds have passed since the last save."""
        if self.dirty is not None and time.monotonic() - self.saved >= self.every:
            self.write(self.dirty, reconnect=False)

    def write(self, now, reconnect):
        """`now`: the row's new finished_at (None: kept, as when a follower that is fine stops,
        so its row does not rise above a newer copy's on the status page)."""
        log, ok, message = self.models.log, self.ok, self.message
        changed = {"finished_at": now} if now is not None else {}
        self.saved = time.monotonic()
        for attempt in (1, 2):
            try:
                if self.row is not None and not log.objects.using(self.using).filter(
                    pk=self.row.pk
                ).update(ok=ok, summary=self.summary, message=message, **changed):
                    self.row = None  # deleted meanwhile (a restore, say): made again
                if self.row is None:
                    self.close_dead_runs()  # in case there was no OperationLog at start
                    now = now or timezone.now()
                    self.row = log.objects.using(self.using).create(
                        kind="copy", ok=ok, started_at=now, finished_at=now,
                        summary=self.summary, message=message,
                    )  # fmt: skip
                self.dirty = None
                return
            except DatabaseError:
                if not reconnect or attempt == 2:
                    return  # the database is gone (the message is on stderr); kept dirty
                # The follower's connection died (its lock and LISTEN with it): say how it
                # ended on a new one, if the database answers.
                connections[self.using].close()

    def stop(self, done: Followed, *, ok, message):
        if self.row is None and ok:
            return  # it wrote nothing and refused nothing: nothing to show
        if ok and not self.ok:  # it stopped while its syncs refused: that still stands
            ok, message = False, f"{message} Its last sync refused: {self.message}"
        self.summary["follower"] = "stopped"
        # A clean stop keeps finished_at (the last write, refusal or recovery), or takes the
        # time of a write whose save was held back.
        if ok and self.dirty is not None:
            self.ok, self.message = ok, message
            self.write(self.dirty, reconnect=False)
            return
        self.save(done, ok=ok, message=message, reconnect=not ok, bump=not ok)

    def report(self, reports: Path) -> Path | None:
        """The report the row names (kept while it does)."""
        name = self.summary.get("report")
        return reports / name if name else None

    def close_dead_runs(self):
        """Rows still 'running' belong to followers that died without a word (kill -9, the
        host lost): this follower holds the lock, so no other runs (a follower says it
        stopped before it releases the lock). Say so on them, in one statement."""
        log = self.models.log
        if log is None:
            return
        with connections[self.using].cursor() as cursor:
            cursor.execute(
                f"UPDATE {log._meta.db_table} SET ok = false, "
                "summary = jsonb_set(summary, '{follower}', '\"stopped\"'), "
                "message = 'Stopped without a word (killed?). Its last state: ' || message "
                "WHERE kind = 'copy' AND summary ->> 'follower' = 'running'"
            )


def follower_pid(cursor) -> int | None:
    """The backend holding the follower's lock in this database (a bigint advisory key is
    classid 0, objid the key, objsubid 1), or None."""
    cursor.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s "
        "AND objsubid = 1 AND granted AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database()) LIMIT 1",
        [FOLLOW_KEY],
    )
    row = cursor.fetchone()
    return row[0] if row else None


@dataclass
class LogState:
    """The change log at a glance (the status page). `capture`: 'on', or why not; the counts
    are None when they mean nothing (no capture: writes are not logged, so nothing waits)."""

    capture: str
    waiting: int | None = None  # legacy writes logged, not applied yet (no 'pending', 'full')
    full: bool = False  # a 'full' row waits: the next sync compares every user
    lag: float | None = None  # seconds since the oldest waiting row (or 'full') was logged
    pending: int | None = None  # users kept in the log: rejected (`--skip-invalid`), conflicts
    new_side: int | None = None  # users NewUser's log holds since the cut-over
    follower_pid: int | None = None
    follower_activity: str = ""  # "its backend idle for 2 s", "... active for 40 s", or ""
    follower_known: bool = False  # whether `follower_pid` was looked up (not on SQLite, errors)
    unknown: bool = False  # writes may be waiting, but the log cannot say (capture off)


def log_state(models, using: str = "default") -> LogState:
    connection = connections[using]
    if connection.vendor != "postgresql":
        return LogState("none on SQLite: each sync compares every user", follower_known=True)
    table = models.changes._meta.db_table
    with connection.cursor() as cursor:
        pid = follower_pid(cursor)
        activity = ""
        if pid:  # a follower blocked (on a row lock, say) shows as active for long
            cursor.execute(
                "SELECT state, EXTRACT(EPOCH FROM now() - state_change) FROM pg_stat_activity "
                "WHERE pid = %s",
                [pid],
            )
            row = cursor.fetchone()
            if row and row[0] and row[1] is not None:  # hidden without pg_read_all_stats
                activity = f"its backend {row[0]} for {float(row[1]):.0f} s"
        follower = dict(follower_pid=pid, follower_activity=activity, follower_known=True)
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [connection.ops.quote_name(table)])
        if not cursor.fetchone()[0]:
            return LogState("not installed yet: run `python manage.py migrate`", **follower)
        if readonly.is_read_only(models.legacy, using):
            cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE side = 'new' AND op <> 'full'")
            return LogState(
                "suspended: cut over, the legacy table is read-only",
                new_side=cursor.fetchone()[0],
                **follower,
            )
        tables = sorted({t for _, t, _ in changecapture.triggers()})  # row triggers only
        missing = changecapture.missing(connection, tables)
        if missing:
            return LogState(
                f"off: {', '.join(missing[:3])} missing or disabled (run `python manage.py "
                "migrate`); each sync compares every user",
                **follower,
                unknown=True,
            )
        unwatched = changecapture.ddl_watch_missing(connection)
        cursor.execute(
            "SELECT COUNT(*) FILTER (WHERE op NOT IN ('pending', 'full')), "
            "COALESCE(bool_or(op = 'full'), "
            "false), EXTRACT(EPOCH FROM now() - MIN(at) FILTER (WHERE op <> 'pending')), "
            f"COUNT(DISTINCT user_id) FILTER (WHERE op = 'pending') FROM {table} "
            "WHERE side = 'legacy'"
        )
        waiting, full, lag, pending = cursor.fetchone()
    capture = "on"
    if changecapture.notify_missing(connection):
        capture = (
            f"on, but the NOTIFY trigger of the change log ({changecapture.LOG_TABLE}_notify) is "
            "missing or disabled: a follower carries each write at its heartbeat (5 s), not as "
            "it commits (run `python manage.py migrate`)"
        )
    if unwatched:
        capture = (
            f"on, but the DDL watch is missing or disabled ({', '.join(unwatched)}): a capture "
            "trigger switched off and on again would go unseen (run `python manage.py migrate` "
            "as a superuser)"
        )
    return LogState(
        capture, waiting=waiting, full=full, lag=float(lag) if lag is not None else None,
        pending=pending, **follower,
    )  # fmt: skip
