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
   sync finished, a row referencing a deleted user was removed, the database came back);
5. on SIGTERM or SIGINT (Ctrl-C) finishes the sync in hand and returns.

A sync that refuses (a rejected row under the default policy, a conflict, another sync
running) is reported once, not once per write, and retried at the next change or heartbeat. While there
is nothing to follow (migrations not applied yet, so no first copy; or cut over) it says so
once and looks again every `heartbeat` seconds: as a service it never exits on its own.
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
    """The legacy table became read-only: the follower's work is over."""


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
            cursor.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
                "AND granted AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database()) LIMIT 1",
                [FOLLOW_KEY],
            )
            holder = cursor.fetchone()
            raise FollowError(
                "Another follower is running on this database"
                + (f" (database backend pid {holder[0]})" if holder else "")
                + ": one at a time. Stop it first (SIGTERM), or let it carry the changes."
            )
        cursor.execute(f"LISTEN {CHANNEL}")
        cursor.execute("SELECT pg_backend_pid()")
        own_pid = cursor.fetchone()[0]
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
            # Once, not once per write: the same refusal names a new report each time.
            if REPORT.sub("", str(exc)) != last_refusal:
                last_refusal = REPORT.sub("", str(exc))
                named = REPORT.search(str(exc))
                announced = Path(named.group()) if named else None
                record(models, using, ok=False, message=str(exc))
                if on_refused:
                    on_refused(str(exc))
            keep_newest(reports, keep=announced)
            return
        same_connection()
        announced = None
        keep_newest(reports)
        last_refusal = None
        done.syncs += 1
        done.copied += result.copied
        done.updated += result.updated
        done.deleted += result.deleted
        if on_sync:
            on_sync(result)

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
                        alive_file,
                    )  # fmt: skip
                except CutOver:
                    continue  # idle_reason says so, once
    except (DatabaseError, psycopg.Error) as exc:
        raise FollowError(
            f"The database connection failed ({str(exc).strip().splitlines()[0]}); the "
            "follower stopped. What it had not committed is still in the change log: start "
            "it again."
        ) from exc
    finally:
        # A connection that is gone took its lock and its LISTEN with it.
        with suppress(DatabaseError), connection.cursor() as cursor:
            cursor.execute(f"UNLISTEN {CHANNEL}")
            cursor.execute("SELECT pg_advisory_unlock(%s)", [FOLLOW_KEY])
    done.stopped_by = getattr(stop, "signal_name", "") or "asked"
    record(models, using, ok=True, message=summary_line(done))
    return done


def carry(sync_once, stop, connection, own_pid, heartbeat, models, using, alive_file):
    """Sync at each notification (or heartbeat with a non-empty log) until `stop`. Every
    note waiting is read before one sync: a sync carries all that committed before it."""
    waited = time.monotonic()
    while not stop.is_set():
        touch(alive_file)
        # Short waits, so a stop request is seen within half a second. A note sent by this
        # follower's own sync (the 'pending' rows it logs again) wakes nobody. Closed at
        # once: the generator holds the connection's lock until it ends.
        with closing(connection.connection.notifies(timeout=0.5, stop_after=1)) as notes:
            woken = any(note.pid != own_pid for note in notes)
        woken = drain(connection, own_pid) or woken
        if stop.is_set():
            return
        if not woken and time.monotonic() - waited >= heartbeat:
            # Rows left in the log: a refused sync, or users kept pending, tried again (their
            # cause may have passed with no legacy write). Cheap: it reads only those users.
            woken = newest_log_id(models, using) is not None
            waited = time.monotonic()
        if woken:
            sync_once()
            waited = time.monotonic()


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


def record(models, using, *, ok, message):
    """One OperationLog row per refusal (when it changes) and one when the follower stops;
    the syncs themselves are not logged one by one (there can be several a second)."""
    if models.log is None:
        return
    with suppress(DatabaseError):  # the database is gone: the message is on stderr
        models.log.objects.using(using).create(
            kind="copy", ok=ok, started_at=timezone.now(), summary={}, message=message
        )
