"""`copy_users --follow` (PostgreSQL): each legacy write carried as it commits, a clean stop
on SIGTERM, one follower at a time, and nothing lost when it is killed."""

import re
import signal
import threading
import time

import pytest

from . import test_cutover
from .conftest import assert_clean_failure
from .test_cutover import OLD, postgresql_only

deploy1_template = test_cutover.deploy1_template
deploy = test_cutover.deploy


def start_follower(deploy, *args):
    """A follower process, returned once it says it follows (its first sync done)."""
    proc = deploy.popen(OLD, "copy_users", "--follow", *args)
    return proc, read_until(proc, "Following the change log")


def wait_for(predicate, seconds=20):
    """A liveness check, not a timing: the bench measures the lag."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def differing(deploy) -> int:
    return deploy.one(
        "SELECT COUNT(*) FROM account_user l FULL JOIN account_newuser n ON n.id = l.id "
        "WHERE l.id IS NULL OR n.id IS NULL OR l.full_name IS DISTINCT FROM n.full_name"
    )


@postgresql_only
def test_the_follower_carries_each_write_and_stops_on_sigterm(deploy):
    deploy.sql("UPDATE account_user SET full_name = 'Before The Follower' WHERE username = 'bob'")
    proc, _ = start_follower(deploy)
    try:
        # What was written while no follower ran: its first sync carried it.
        assert deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'") == (
            "Before The Follower"
        )
        deploy.sql("UPDATE account_user SET full_name = 'Followed' WHERE username = 'bob'")
        assert wait_for(
            lambda: (
                deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'")
                == "Followed"
            )
        )
        second = deploy.manage(OLD, "copy_users", "--follow", timeout=60)
        assert_clean_failure(second, "Another follower is running on this database")
        assert len(second.stderr.strip().splitlines()) == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "Follower stopped (SIGTERM)" in out and "Traceback" not in out
    assert deploy.one("SELECT COUNT(*) FROM account_changelog WHERE side = 'legacy'") == 0


@postgresql_only
def test_a_follower_killed_mid_load_loses_nothing(deploy):
    """kill -9 while writers run: the log position commits with the writes, so one sync
    afterwards brings NewUser level with the legacy table."""
    proc, _ = start_follower(deploy)
    halt = threading.Event()

    def write():
        with deploy.connect() as conn:
            n = 0
            while not halt.is_set():  # signups (each written once) and edits
                n += 1
                conn.execute(
                    "INSERT INTO account_user (password, is_superuser, username, email, "
                    "full_name, phone_number, is_active, is_staff) VALUES "
                    "('!unusable', false, %s, %s, '', '', true, false)",
                    [f"signup{n}", f"signup{n}@example.com"],
                )
                conn.execute(
                    "UPDATE account_user SET full_name = %s WHERE id = "
                    "(SELECT id FROM account_user ORDER BY random() LIMIT 1)",
                    [f"Write {n}"],
                )

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.5)
    finally:
        halt.set()
        writer.join()
        proc.kill()
    assert deploy.one("SELECT COUNT(*) FROM account_changelog WHERE side = 'legacy'") > 0
    deploy.ok(OLD, "copy_users")
    assert differing(deploy) == 0
    ((ok, summary, message),) = follower_rows(deploy)
    assert summary["follower"] == "running"  # it could not say otherwise
    again, _ = start_follower(deploy)  # the next follower says it on the dead one's row
    stop(again)
    ((ok, summary, message),) = follower_rows(deploy)
    assert not ok and summary["follower"] == "stopped", summary
    assert message.startswith("Stopped without a word (killed?)"), message


def read_until(proc, prefix, seconds=60):
    """The process's lines up to one starting with `prefix`; a process silent for longer than
    `seconds` is killed (its stdout then ends), so the test fails instead of hanging."""
    watchdog = threading.Timer(seconds, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                return lines
    finally:
        watchdog.cancel()
    proc.kill()
    pytest.fail(f"no line starting with {prefix!r}: " + "".join(lines))


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


@postgresql_only
def test_a_follower_waits_through_the_cutover_and_follows_again_after_the_rollback(deploy):
    """As a service it never exits on its own: cut over, it waits; rolled back, it follows."""
    proc, _ = start_follower(deploy)
    try:
        stop(proc)  # the cut-over wants no sync running
        deploy.cutover()
        proc = deploy.popen(OLD, "copy_users", "--follow")
        read_until(proc, "The cut-over is done")
        deploy.rollback()
        deploy.sql(
            "UPDATE account_user SET full_name = 'After The Rollback' WHERE username = 'bob'"
        )
        assert wait_for(
            lambda: (
                deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'")
                == "After The Rollback"
            ),
            seconds=60,
        )
        assert "Follower stopped (SIGTERM)" in stop(proc)
    finally:
        proc.kill()


def follow_through_migrate(deploy, waiting, then=None) -> str:
    """Start a follower, see it wait (`waiting`, the line's start), migrate, see it follow,
    run `then()` while it does; its output once stopped."""
    proc = deploy.popen(OLD, "copy_users", "--follow")
    try:
        read_until(proc, waiting)
        deploy.ok(OLD, "migrate", "--no-input")
        read_until(proc, "Following the change log")
        if then:
            then()
        return stop(proc)
    finally:
        proc.kill()


@postgresql_only
def test_a_follower_started_before_the_migrations_waits_for_them(deploy):
    deploy.sql("DELETE FROM django_migrations WHERE app = 'account' AND name LIKE '0007%%'")
    follow_through_migrate(
        deploy, "Waiting for `python manage.py migrate` (1 migrations not applied"
    )


@postgresql_only
def test_a_follower_started_on_an_empty_database_waits_for_the_migrations(deploy):
    """As the compose `sync` service starts, before anything is migrated: no table at all."""
    deploy.sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")

    def write_and_see_it_carried():
        deploy.sql("UPDATE account_user SET full_name = 'After' WHERE username = 'bob'")
        assert wait_for(lambda: len(follower_rows(deploy)) == 1)

    out = follow_through_migrate(
        deploy, "Waiting for `python manage.py migrate`", then=write_and_see_it_carried
    )
    assert "Traceback" not in out, out


@postgresql_only
def test_a_refusing_sync_is_said_once_and_keeps_one_report(deploy):
    """Under the default policy a rejected legacy row makes every sync refuse: the follower
    says so once (not once per write), keeps only its newest report, and carries the rest as
    soon as the row is fixed."""
    proc, _ = start_follower(deploy)
    try:
        deploy.sql("UPDATE account_user SET email = 'not-an-email' WHERE username = 'bob'")
        for n in range(5):
            time.sleep(0.3)
            deploy.sql(
                "UPDATE account_user SET full_name = %s WHERE username = 'alice'", [f"Try {n}"]
            )
        time.sleep(1)
        deploy.sql("UPDATE account_user SET email = 'bob@example.com' WHERE username = 'bob'")
        assert wait_for(
            lambda: (
                deploy.one("SELECT full_name FROM account_newuser WHERE username = 'alice'")
                == "Try 4"
            )
        )
        out = stop(proc)
    finally:
        proc.kill()
    assert out.count("the sync refused") == 1, out
    assert "email_invalid" in out
    assert len(list((deploy.tmp_path / "reports" / "follower").rglob("*.csv"))) <= 1


@postgresql_only
def test_follow_refuses_dry_run_and_full(deploy):
    for extra in ("--dry-run", "--full"):
        proc = deploy.manage(OLD, "copy_users", "--follow", extra, timeout=60)
        assert_clean_failure(proc, "--follow writes, from the change log")


@postgresql_only
def test_a_follower_stopped_by_ctrl_c_exits_0_and_its_alive_file_is_kept_fresh(deploy):
    alive = deploy.tmp_path / "alive"
    proc, _ = start_follower(deploy, "--alive-file", str(alive))
    try:
        first = alive.stat().st_mtime
        assert wait_for(lambda: alive.stat().st_mtime > first)  # touched while it waits
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Follower stopped (SIGINT)" in out, out


@pytest.mark.django_db
def test_on_sqlite_follow_refuses_in_one_line():
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.db import connection

    if connection.vendor == "postgresql":
        pytest.skip("SQLite only")
    with pytest.raises(CommandError, match="--follow needs PostgreSQL"):
        call_command("copy_users", "--follow")


@postgresql_only
def test_notes_received_while_cut_over_do_not_make_the_follower_spin(deploy):
    """Every NewUser write while cut over notifies too (the log is one table): they are
    dropped while the follower waits, and one sync follows the rollback, not one per note."""
    deploy.cutover()
    proc = deploy.popen(OLD, "copy_users", "--follow")
    try:
        read_until(proc, "The cut-over is done")
        with deploy.connect() as conn:
            for n in range(300):
                conn.execute("UPDATE account_newuser SET full_name = %s WHERE username = 'bob'",
                             [f"New {n}"])  # fmt: skip
        time.sleep(6)  # one idle round: the notes are drained
        deploy.rollback()
        read_until(proc, "Following the change log")
        time.sleep(2)
        out = stop(proc)
    finally:
        proc.kill()
    syncs = int(re.search(r"Follower stopped \(SIGTERM\): (\d+) syncs", out)[1])
    assert syncs <= 3, out


@postgresql_only
def test_a_follower_whose_connection_is_killed_stops_in_one_line(deploy):
    """Its lock and its LISTEN went with the connection: it stops (exit 1, one line), and a
    new follower can start."""
    proc, _ = start_follower(deploy)
    try:
        deploy.sql("UPDATE account_user SET full_name = 'Before' WHERE username = 'bob'")
        assert wait_for(lambda: len(follower_rows(deploy)) == 1)
        (pid,) = deploy.sql(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 727002 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )[0]
        deploy.sql("SELECT pg_terminate_backend(%s)", [pid])
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "copy_users: error:" in out, out
    ((ok, summary, message),) = follower_rows(deploy)  # its run row says how it ended
    assert not ok and summary["follower"] == "stopped", summary
    assert "database connection" in message and "start it again" in message, message
    again, _ = start_follower(deploy)
    stop(again)


@postgresql_only
def test_a_refusal_whose_cause_passes_without_a_legacy_write_is_retried(deploy):
    """Another sync held the lock past the follower's wait: its sync refused. Nothing new is
    written to the legacy table after the lock is released, yet the write is carried at the
    next heartbeat (what makes a sync refuse can pass with no legacy write at all)."""
    proc, _ = start_follower(deploy)
    try:
        with deploy.connect() as holder:
            holder.execute("SELECT pg_advisory_lock(727001)")  # the sync's own lock
            deploy.sql("UPDATE account_user SET full_name = 'Held Up' WHERE username = 'bob'")
            read_until(proc, "copy_users --follow: the sync refused: Another user sync")
            holder.execute("SELECT pg_advisory_unlock(727001)")
        assert wait_for(
            lambda: (
                deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'")
                == "Held Up"
            )
        ), "the refused write was not carried after its cause passed"
        # Refused again, with nothing left to write when the lock is released (bob is back as
        # NewUser has him): the recovery alone puts the run row right.
        with deploy.connect() as holder:
            holder.execute("SELECT pg_advisory_lock(727001)")
            deploy.sql("UPDATE account_user SET full_name = 'Not Kept' WHERE username = 'bob'")
            deploy.sql("UPDATE account_user SET full_name = 'Held Up' WHERE username = 'bob'")
            read_until(proc, "copy_users --follow: the sync refused: Another user sync")
            assert not follower_rows(deploy)[0][0]
            holder.execute("SELECT pg_advisory_unlock(727001)")
        assert wait_for(lambda: follower_rows(deploy)[0][0]), "the recovery was not saved"
        out = stop(proc)
    finally:
        proc.kill()
    assert "Traceback" not in out, out


FOLLOWER_ROWS = "SELECT ok, summary, message FROM account_operationlog WHERE summary ? 'follower'"
FINISHED = "SELECT finished_at FROM account_operationlog WHERE summary ? 'follower'"


def follower_rows(deploy):
    return deploy.sql(FOLLOWER_ROWS + " ORDER BY id")


@postgresql_only
def test_a_follower_keeps_one_operation_log_row_with_its_last_sync(deploy):
    """The status page reads the follower's run from one OperationLog row: its totals, the
    last change applied, the last sync's refusal and rejected rows; saved when it stops."""
    proc, _ = start_follower(deploy)
    try:
        assert follower_rows(deploy) == []  # nothing written yet: nothing to show
        deploy.sql("UPDATE account_user SET full_name = 'Row One' WHERE username = 'bob'")
        assert wait_for(lambda: len(follower_rows(deploy)) == 1)
        ((ok, summary, message),) = follower_rows(deploy)
        assert ok and summary["follower"] == "running" and summary["updated"] == 1, summary
        applied = summary["applied_at"]
        with deploy.connect() as conn, conn.transaction():  # a refused sync's writes are undone
            conn.execute("UPDATE account_user SET email = 'not-an-email' WHERE username = 'bob'")
            conn.execute("UPDATE account_user SET full_name = 'Not Yet' WHERE username = 'alice'")
        assert wait_for(lambda: not follower_rows(deploy)[0][0])
        ((ok, summary, message),) = follower_rows(deploy)
        assert "email_invalid" in message and summary["applied_at"] == applied
        assert summary["rejected_by_reason"] == {"email_invalid": 1}, summary
        deploy.sql("UPDATE account_user SET email = 'bob@example.com' WHERE username = 'bob'")
        assert wait_for(lambda: follower_rows(deploy)[0][0])  # recovered (alice applied)
        ((ok, summary, message),) = follower_rows(deploy)
        assert summary["applied_at"] > applied and summary["rejected"] == 0, summary
        applied = summary["applied_at"]
        deploy.sql("UPDATE account_user SET email = 'not-an-email' WHERE username = 'bob'")
        assert wait_for(lambda: not follower_rows(deploy)[0][0])
        deploy.sql("UPDATE account_user SET email = 'bob@example.com' WHERE username = 'bob'")
        # Recovered with nothing to write (bob is back as NewUser has him): ok again, and the
        # last change applied is still the one before.
        assert wait_for(lambda: follower_rows(deploy)[0][0])
        ((ok, summary, message),) = follower_rows(deploy)
        assert summary["applied_at"] == applied, summary
        assert message.startswith("Follower running: ")
        stop(proc)
    finally:
        proc.kill()
    ((ok, summary, message),) = follower_rows(deploy)
    assert ok and summary["follower"] == "stopped" and message.startswith("Follower stopped")


@postgresql_only
def test_a_follower_carries_writes_while_a_capture_trigger_is_disabled(deploy):
    """A disabled capture trigger logs nothing and notifies nobody: the follower's heartbeat
    then compares every user, so the write is still carried."""
    proc, _ = start_follower(deploy)
    try:
        deploy.sql("ALTER TABLE account_user DISABLE TRIGGER account_user_capture_update")
        deploy.sql("UPDATE account_user SET full_name = 'Unlogged' WHERE username = 'bob'")
        assert wait_for(
            lambda: (
                deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'")
                == "Unlogged"
            )
        ), "a write made while capture was off was not carried"
        stop(proc)
    finally:
        proc.kill()
        deploy.sql("ALTER TABLE account_user ENABLE TRIGGER account_user_capture_update")


def in_process_follower(monkeypatch, tmp_path, sync, seconds=None):
    """`follow` in this process with `copy_users` replaced by `sync`, and always work left at
    each heartbeat (0.5 s); stopped after `seconds`, if given. Returns its run rows."""
    from django.db import connection

    from account import follower
    from account.cutover import MODELS

    monkeypatch.setattr(follower, "copy_users", sync)
    monkeypatch.setattr(follower, "work_left", lambda models, using: True)
    monkeypatch.setattr(follower, "idle_reason", lambda models, using: "")
    stop = threading.Event()
    if seconds is not None:
        threading.Timer(seconds, stop.set).start()
    try:
        follower.follow(MODELS, skip_invalid=True, batch_size=100, report_dir=tmp_path,
                        heartbeat=0.5, stop=stop)  # fmt: skip
    finally:
        stop.set()
        with connection.cursor() as cursor:
            cursor.execute(FOLLOWER_ROWS)
            rows = cursor.fetchall()
    return rows


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_a_follower_stopped_by_a_bug_says_so_in_its_run_row(monkeypatch, tmp_path):
    from account import follower

    calls = []

    def sync(models, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise follower.CopyError("refused, for the test")
        raise RuntimeError("a bug, for the test")

    with pytest.raises(RuntimeError):
        in_process_follower(monkeypatch, tmp_path, sync)
    from account.models import OperationLog

    (row,) = OperationLog.objects.filter(summary__follower="stopped")
    assert not row.ok and "a bug, for the test" in row.message


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_heartbeats_whose_full_compare_changes_nothing_back_off(monkeypatch, tmp_path):
    """Capture off (or a refusal under a full compare): each heartbeat would compare every
    user, seconds at a million. Each one that changed nothing doubles the wait."""
    from account.usercopy import CopyResult

    calls = []

    def sync(models, **kwargs):
        calls.append(time.monotonic())
        return CopyResult(source="full", source_reason="capture off, for the test")

    in_process_follower(monkeypatch, tmp_path, sync, seconds=8)
    # Without the back-off: one every 0.5-1 s (10 or more); with it: 0.5, 1, 2, 4 s apart.
    assert 3 <= len(calls) <= 6, [round(b - a, 1) for a, b in zip(calls, calls[1:], strict=False)]


@postgresql_only
def test_the_report_a_follower_run_row_names_is_kept(deploy):
    """With --skip-invalid a pending user is looked at again at each heartbeat, and each sync
    writes a report: the one the status page names stays on disk."""
    proc, _ = start_follower(deploy, "--skip-invalid")
    try:
        deploy.sql("UPDATE account_user SET email = 'not-an-email' WHERE username = 'bob'")
        assert wait_for(lambda: follower_rows(deploy) and follower_rows(deploy)[0][1]["report"])
        time.sleep(11)  # two heartbeats, two more reports
        ((ok, summary, message),) = follower_rows(deploy)
        folder = deploy.tmp_path / "reports" / "follower"
        assert summary["report"] in [p.name for p in folder.rglob("*.csv")], summary
        stop(proc)
    finally:
        proc.kill()


@postgresql_only
def test_a_follower_waits_when_the_change_log_is_migrated_away(deploy):
    """`migrate account 0002` while it follows drops the log: it waits for the migrations
    again (as a follower started before them does), not a false "connection failed"."""
    proc, _ = start_follower(deploy)
    try:
        deploy.ok(OLD, "migrate", "account", "0002")
        read_until(proc, "Waiting for `python manage.py migrate`")
        out = stop(proc)
    finally:
        proc.kill()
    assert "connection failed" not in out, out


def test_the_heartbeat_backs_off_only_after_idle_full_compares():
    from account.follower import Backoff

    b = Backoff(5.0)
    assert b.wait == 5.0
    for expected in (10.0, 20.0, 40.0, 60.0, 60.0, 60.0):  # doubled, at most 12 heartbeats
        b.synced(beat=True, idle_full_compare=True)
        assert b.wait == expected
    b.synced(beat=False, idle_full_compare=True)  # a writer's note woke it
    assert b.wait == 5.0
    b.synced(beat=True, idle_full_compare=True)
    b.synced(beat=True, idle_full_compare=False)  # it wrote, or read only the log
    assert b.wait == 5.0
    b.synced(beat=True, idle_full_compare=True)
    b.nothing_to_do()
    assert b.wait == 5.0


@postgresql_only
@pytest.mark.django_db
def test_work_is_left_while_a_capture_trigger_or_the_ddl_watch_is_off():
    """The heartbeat syncs then (a write may not be logged), as `copy_users` compares every
    user then; with the log empty and capture whole, it does not."""
    from django.db import connection

    from account import follower
    from account.cutover import MODELS
    from account.models import ChangeLog

    ChangeLog.objects.all().delete()
    assert not follower.work_left(MODELS, "default")
    for statement in (
        "ALTER EVENT TRIGGER account_capture_ddl DISABLE",
        "ALTER TABLE account_user_groups DISABLE TRIGGER account_user_groups_capture",
    ):
        with connection.cursor() as cursor:  # rolled back with the test's transaction
            cursor.execute("SAVEPOINT s")
            cursor.execute(statement)
            ChangeLog.objects.all().delete()  # the DDL watch's 'full' row
            assert follower.work_left(MODELS, "default"), statement
            cursor.execute("ROLLBACK TO SAVEPOINT s")


@postgresql_only
def test_a_held_back_save_is_flushed_and_a_clean_stop_keeps_finished_at(deploy):
    """Two writes within the save interval: the first saves the run row at once, the second
    within a heartbeat while the follower waits; stopping it cleanly then changes neither
    the last change applied nor finished_at."""
    proc, _ = start_follower(deploy)
    try:
        deploy.sql("UPDATE account_user SET full_name = 'First' WHERE username = 'bob'")
        assert wait_for(lambda: len(follower_rows(deploy)) == 1)
        deploy.sql("UPDATE account_user SET full_name = 'Second' WHERE username = 'alice'")
        assert wait_for(lambda: follower_rows(deploy)[0][1]["updated"] == 2), "never flushed"
        time.sleep(1)
        finished = deploy.one(FINISHED)
        applied = follower_rows(deploy)[0][1]["applied_at"]
        stop(proc)
    finally:
        proc.kill()
    ((ok, summary, message),) = follower_rows(deploy)
    assert summary["follower"] == "stopped" and summary["applied_at"] == applied
    assert deploy.one(FINISHED) == finished


@postgresql_only
def test_a_clean_stop_saves_a_held_back_write_with_its_time(deploy):
    proc, _ = start_follower(deploy)
    try:
        deploy.sql("UPDATE account_user SET full_name = 'First' WHERE username = 'bob'")
        assert wait_for(lambda: len(follower_rows(deploy)) == 1)
        deploy.sql("UPDATE account_user SET full_name = 'Held' WHERE username = 'alice'")
        assert wait_for(
            lambda: (
                deploy.one("SELECT full_name FROM account_newuser WHERE username = 'alice'")
                == "Held"
            )
        )
        stop(proc)  # within the save interval: its save was held back
    finally:
        proc.kill()
    ((ok, summary, message),) = follower_rows(deploy)
    assert summary["updated"] == 2, summary
    finished = deploy.one(FINISHED)
    from datetime import datetime

    assert finished >= datetime.fromisoformat(summary["applied_at"]), summary
