"""The user copy: nothing lost, nothing silent, verified, reversible, safe to repeat."""

import csv
import signal
import subprocess
import sys
import threading
import time

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from account import usercopy
from account.dbutil import insert_rows
from account.fakedata import COLUMNS, FakeUsers
from account.models import Address, NewUser, OperationLog, Profile, SyncState, User

from .conftest import ROOT, make_legacy, subprocess_env

EXPECTED_REJECTIONS = {
    "dup_a": "email_duplicate",
    "dup_b": "email_duplicate",
    "case_a": "email_duplicate",
    "case_b": "email_duplicate",
    "empty": "email_empty",
    "malformed": "email_invalid",
    "garbage_phone": "phone_letters",
    "short_phone": "phone_invalid",
    "indian_phone": "phone_invalid",
    "bad_username": "username_invalid",
}


def report_rows(text):
    path = next(line.split("report: ", 1)[1] for line in text.splitlines() if "report: " in line)
    with open(path, newline="") as f:
        return {int(r["legacy_id"]): r for r in csv.DictReader(f)}


def snapshot():
    """Every copied user with everything the copy is responsible for (not the copy time)."""
    return {
        u.pk: (
            u.username,
            u.email,
            u.password,
            u.full_name,
            u.date_of_birth,
            str(u.phone_number),
            u.is_active,
            u.is_staff,
            u.is_superuser,
            u.last_login,
            tuple(u.groups.values_list("pk", flat=True)),
            tuple(u.user_permissions.values_list("pk", flat=True)),
            Profile.objects.filter(user=u).count(),
        )  # fmt: skip
        for u in NewUser.objects.order_by("pk")
    }


@pytest.mark.django_db
def test_default_policy_writes_nothing_and_reports_every_bad_row(run, dirty_legacy):
    with pytest.raises(CommandError, match="10 legacy users cannot be synced") as info:
        run("copy_users")
    assert "nothing was written" in str(info.value)
    assert "USER_COPY_SKIP_INVALID=on" in str(info.value)
    assert NewUser.objects.count() == 0 and Profile.objects.count() == 0
    path = str(info.value).split("listed in ", 1)[1].split(". ", 1)[0]
    with open(path, newline="") as f:
        rows = {int(r["legacy_id"]): r for r in csv.DictReader(f)}
    expected = {dirty_legacy["bad"][k].pk: reason for k, reason in EXPECTED_REJECTIONS.items()}
    assert {pk: r["reason"] for pk, r in rows.items()} == expected
    # Every account of a shared-email group has its line, naming the key and the group's size.
    for key in ("dup_a", "dup_b"):
        assert (
            "2 legacy users share the email 'same@example.com'"
            in rows[dirty_legacy["bad"][key].pk]["detail"]
        )


@pytest.mark.django_db
def test_preflight_lists_the_same_rows_and_writes_nothing(run, dirty_legacy):
    with pytest.raises(CommandError, match="10 legacy users cannot be synced") as info:
        run("check_user_migration")
    assert NewUser.objects.count() == 0
    assert not OperationLog.objects.filter(kind="copy").exists()
    path = str(info.value).split("See ", 1)[1].split(". ", 1)[0]
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 10


@pytest.mark.django_db
def test_preflight_with_skip_invalid_summarises_by_reason(run, dirty_legacy):
    out, _ = run("check_user_migration", "--skip-invalid")
    assert "rejected, email_duplicate: 4" in out
    assert "rejected, phone_invalid: 2" in out
    assert "normalised, phone_reformatted: 4" in out
    assert "would insert 37" in out
    assert NewUser.objects.count() == 0


@pytest.mark.django_db
def test_opt_in_copies_exactly_the_valid_rows_field_for_field(run, dirty_legacy):
    out, _ = run("copy_users", "--skip-invalid", "--batch-size", "7")
    bad_ids = {u.pk for u in dirty_legacy["bad"].values()}
    valid = User.objects.exclude(pk__in=bad_ids).order_by("pk")
    assert list(NewUser.objects.order_by("pk").values_list("pk", flat=True)) == [
        u.pk for u in valid
    ]
    for old in valid:
        new = NewUser.objects.get(pk=old.pk)
        assert new.username == old.username
        assert new.password == old.password
        assert new.full_name == old.full_name
        assert new.date_of_birth == old.date_of_birth
        assert new.last_login == old.last_login
        assert (new.is_active, new.is_staff, new.is_superuser) == (
            old.is_active, old.is_staff, old.is_superuser,
        )  # fmt: skip
        assert new.email.lower() == old.email.strip().lower()
        assert Profile.objects.filter(user=new).count() == 1
    admin = NewUser.objects.get(pk=dirty_legacy["admin"].pk)
    assert list(admin.groups.all()) == [dirty_legacy["group"]]
    assert list(admin.user_permissions.all()) == [dirty_legacy["perm"]]
    assert admin.last_login.microsecond == 123456
    norm = {k: NewUser.objects.get(pk=u.pk) for k, u in dirty_legacy["normalised"].items()}
    assert norm["padded"].email == "padded@example.com"
    for key in ("dashes", "spaces", "zero", "plus977"):
        assert str(norm[key].phone_number) == "+9779841234567"
    assert str(norm["foreign"].phone_number) == "+12015550123"
    assert str(norm["no_phone"].phone_number) == ""
    assert "rejected, username_invalid: 1" in out
    assert "normalised, email_trimmed: 1" in out
    assert "normalised, phone_foreign_kept: 1" in out
    assert "normalised, phone_reformatted: 4" in out
    assert len(report_rows(out)) == 10
    assert User.objects.count() == len(valid) + 10  # nothing deleted from the legacy table
    log = OperationLog.objects.get(kind="copy")
    assert log.ok and log.summary["copied"] == len(valid)
    assert log.summary["rejected_by_reason"]["email_duplicate"] == 4


@pytest.mark.django_db
def test_migrated_users_log_in_with_their_old_password_and_signups_still_work(run, dirty_legacy):
    run("copy_users", "--skip-invalid")
    user = dirty_legacy["clean"][5]
    assert authenticate(username=user.username, password="old-secret").pk == user.pk
    assert authenticate(username=user.username, password="wrong") is None
    # The id sequence was moved past the copied ids.
    newcomer = NewUser.objects.create_user("newcomer", "newcomer@example.com", "pw")
    assert newcomer.pk > User.objects.order_by("-pk").first().pk


@pytest.mark.django_db
def test_resync_copies_fixed_rows_and_a_second_run_changes_nothing(run, dirty_legacy):
    run("copy_users", "--skip-invalid")
    before = NewUser.objects.count()
    malformed = dirty_legacy["bad"]["malformed"]
    malformed.email = "fixed@example.com"
    malformed.save()
    late = make_legacy("latecomer", "late@example.com")
    out, _ = run("copy_users", "--skip-invalid")
    assert NewUser.objects.count() == before + 2
    assert NewUser.objects.get(pk=malformed.pk).email == "fixed@example.com"
    assert NewUser.objects.filter(pk=late.pk, username="latecomer").exists()
    state = snapshot()
    times = list(NewUser.objects.order_by("pk").values_list("joined_at", "updated_at"))
    run("copy_users", "--skip-invalid")
    assert snapshot() == state
    assert list(NewUser.objects.order_by("pk").values_list("joined_at", "updated_at")) == times


@pytest.mark.django_db
def test_nothing_to_copy_says_so(run):
    out, _ = run("copy_users")
    assert "Nothing to do" in out


@pytest.mark.django_db
def test_id_taken_by_another_new_user_is_an_error_not_an_overwrite(run):
    legacy = make_legacy("legacy_owner", "owner@example.com")
    NewUser.objects.create(pk=legacy.pk, username="someone_else", email="else@example.com")
    with pytest.raises(CommandError, match="id_taken: 1"):
        run("copy_users")
    out, _ = run("copy_users", "--skip-invalid")
    assert "rejected, id_taken: 1" in out
    assert NewUser.objects.get(pk=legacy.pk).username == "someone_else"


@pytest.mark.django_db
def test_email_already_used_by_a_new_user_is_rejected(run):
    NewUser.objects.create_user("signup", "Taken@example.com", "pw", id=10_000)
    legacy = make_legacy("legacy", "taken@EXAMPLE.com")
    out, _ = run("copy_users", "--skip-invalid")
    assert "rejected, email_taken: 1" in out
    assert not NewUser.objects.filter(pk=legacy.pk).exists()


@pytest.mark.django_db
def test_verification_failure_rolls_everything_back(run, dirty_legacy, monkeypatch):
    real = usercopy.Sync.write_rows

    def corrupting(self):
        real(self)
        fourth = NewUser.objects.order_by("pk")[3]
        NewUser.objects.filter(pk=fourth.pk).update(username=fourth.username + "_x")

    monkeypatch.setattr(usercopy.Sync, "write_rows", corrupting)
    with pytest.raises(CommandError, match="Verification failed.*fields differ"):
        run("copy_users", "--skip-invalid")
    assert NewUser.objects.count() == 0 and Profile.objects.count() == 0
    assert OperationLog.objects.get(kind="copy").ok is False


@pytest.mark.django_db
def test_queries_do_not_grow_with_the_number_of_users(run):
    def queries_for(n):
        User.objects.all().delete()
        NewUser.objects.all().delete()
        SyncState.objects.all().delete()
        cols = COLUMNS
        insert_rows(User, cols, FakeUsers(seed=n).batch(1 + n * 10, n))
        with CaptureQueriesContext(connection) as ctx:
            run("copy_users", "--batch-size", "1000")
        assert NewUser.objects.count() == n
        return len(ctx.captured_queries)

    few, many = queries_for(20), queries_for(600)
    if connection.vendor == "postgresql":
        assert few == many  # COPY: a fixed number of statements per batch
    else:
        # bulk_create splits its INSERTs at SQLite's parameter limit, ~75 rows each.
        assert many - few <= 2 * (600 // 75 + 1)


@pytest.mark.django_db(transaction=True)
def test_reverse_then_forward_gives_the_same_result(run, dirty_legacy, settings):
    settings.USER_COPY_SKIP_INVALID = True
    run("copy_users")
    first = snapshot()
    try:
        run("migrate", "account", "0001")
        assert NewUser.objects.count() == 0 and Profile.objects.count() == 0
        assert User.objects.count() == 47
    finally:
        run("migrate", "account")
    assert snapshot() == first


@pytest.mark.django_db(transaction=True)
def test_reverse_with_a_signup_after_the_copy_refuses_and_changes_nothing(
    run, dirty_legacy, settings
):
    settings.USER_COPY_SKIP_INVALID = True
    run("copy_users")
    signup = NewUser.objects.create_user("signup", "signup@example.com", "pw")
    Address.objects.create(user=signup, street_address="Durbar Marg 1", city="Kathmandu")
    before = snapshot()
    try:
        with pytest.raises(CommandError, match="Refusing to undo") as info:
            run("migrate", "account", "0001")
    finally:
        run("migrate", "account")  # no-op when the reverse refused
    message = str(info.value)
    assert "1 new users were not made by the copy" in message and "account_address" in message
    assert "make backup" in message
    assert snapshot() == before
    assert "[X] 0002" in run("showmigrations", "account")[0]


def _dirty_free_legacy(n):
    insert_rows(User, COLUMNS, FakeUsers(seed=11, password="pw").batch(1, n))


def _copy_process(*args):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "copy_users", *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_copy_killed_with_sigkill_leaves_nothing_and_the_next_run_succeeds():
    _dirty_free_legacy(20_000)
    proc = _copy_process("--batch-size", "500", "-v", "2")
    try:
        line = proc.stdout.readline()  # the first batch is written when this arrives
        assert "legacy users processed" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert NewUser.objects.count() == 0 and Profile.objects.count() == 0
    # The server notices the dead client within moments; then the next run goes through.
    for _ in range(50):
        rerun = _copy_process()
        out, err = rerun.communicate(timeout=120)
        if "Another user sync is running" not in out + err:
            break
        time.sleep(0.2)
    assert rerun.returncode == 0, out + err
    assert NewUser.objects.count() == 20_000 == Profile.objects.count()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_copies_at_once_do_the_work_once():
    _dirty_free_legacy(20_000)
    first, second = _copy_process("--batch-size", "500"), _copy_process("--batch-size", "500")
    results = [p.communicate(timeout=300) for p in (first, second)]
    outputs = [out + err for out, err in results]
    for proc, output in zip((first, second), outputs, strict=True):
        assert "Traceback" not in output, output
        assert proc.returncode == 0 or "Another user sync is running" in output, output
    assert sum("Inserted 20000" in o for o in outputs) == 1, outputs
    assert NewUser.objects.count() == 20_000 == Profile.objects.count()


@pytest.mark.django_db(transaction=True)
def test_a_copy_while_another_holds_the_lock_refuses_clearly(run):
    if connection.vendor != "postgresql":
        pytest.skip("the advisory lock is PostgreSQL's; SQLite queues writers instead")
    import psycopg

    from .conftest import database_url

    make_legacy("someone", "someone@example.com")
    holding, release = threading.Event(), threading.Event()

    def hold():
        with psycopg.connect(database_url(connection.settings_dict)) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", [usercopy.LOCK_KEY])
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        with pytest.raises(CommandError, match="Another user sync is running"):
            run("copy_users")
    finally:
        release.set()
        thread.join()
    assert NewUser.objects.count() == 0
    call_command("copy_users", verbosity=0)
    assert NewUser.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("command", ["copy_users", "check_user_migration"])
def test_bad_batch_size_is_refused_and_nothing_is_written(run, dirty_legacy, command):
    with pytest.raises(CommandError, match="--batch-size must be greater than 0"):
        run(command, "--batch-size", "0", "--skip-invalid")
    assert NewUser.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("size", [0, -1])
def test_copy_users_itself_refuses_a_bad_batch_size(dirty_legacy, tmp_path, size):
    """Not only the command: a server-side cursor asked for no rows would verify nothing."""
    models = usercopy.CopyModels(
        legacy=User, new=NewUser, profile=Profile, state=SyncState, log=OperationLog
    )
    with pytest.raises(usercopy.CopyError, match=f"batch size must be at least 1, not {size}"):
        usercopy.copy_users(models, skip_invalid=True, batch_size=size, report_dir=tmp_path)
    assert NewUser.objects.count() == 0


@pytest.mark.django_db
def test_a_unique_key_the_checks_missed_stops_the_copy_in_one_line(run, monkeypatch):
    # As if another process had written a duplicate after the checks ran.
    monkeypatch.setattr(usercopy.Sync, "find_collisions", lambda self: None)
    make_legacy("first", "same@example.com")
    make_legacy("second", "SAME@example.com")
    with pytest.raises(CommandError, match="The database refused the sync.*run it again"):
        run("copy_users")
    assert NewUser.objects.count() == 0
