"""populate_fake_user_bulk: correct, unique, loggable-in fake legacy users; bad input refused."""

import re
import subprocess
import sys

import phonenumbers
import pytest
from django.contrib.auth.hashers import check_password
from django.core.management.base import CommandError
from django.db import DatabaseError
from django.db.models import Count
from django.db.models.functions import Lower

from account.fakedata import COLUMNS, DEFECT_KINDS, FakeUsers
from account.management.commands import populate_fake_user_bulk as populate_module
from account.models import User

from .conftest import ROOT, assert_clean_failure, manage, subprocess_env

pytestmark = pytest.mark.django_db


def test_users_are_unique_valid_and_realistic(run):
    out, _ = run("populate_fake_user_bulk", "3000", "--batch-size", "700", "--seed", "1")
    assert "Added 3000 legacy users" in out
    assert User.objects.count() == 3000
    assert User.objects.values("username").distinct().count() == 3000
    assert User.objects.annotate(e=Lower("email")).values("e").distinct().count() == 3000
    for user in User.objects.all()[:500]:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", user.full_name)
        assert len(user.phone_number) <= 15
        number = phonenumbers.parse(user.phone_number, "NP")
        assert phonenumbers.is_valid_number(number)
        age_days = (FakeUsers().today - user.date_of_birth).days
        assert 18 * 365 <= age_days <= 90 * 365 + 1
    assert User.objects.filter(is_active=False).exists()


def test_every_user_can_log_in_with_the_documented_password(run, client):
    run("populate_fake_user_bulk", "5", "--password", "s3cret-pass")
    user = User.objects.first()
    assert check_password("s3cret-pass", user.password)
    assert not check_password("wrong", user.password)
    # The password was hashed once: every row carries the same encoded string.
    assert User.objects.values("password").distinct().count() == 1


def test_staff_and_active_flags_are_drawn_independently():
    rows = FakeUsers(seed=11).batch(1, 20_000)
    active, staff = COLUMNS.index("is_active"), COLUMNS.index("is_staff")
    staff_rows = [row for row in rows if row[staff]]
    assert 100 < len(staff_rows) < 300  # about 1%
    # As many staff are active as users at large (97%), so some staff can sign in.
    active_share = sum(row[active] for row in staff_rows) / len(staff_rows)
    assert 0.9 < active_share < 1


def test_same_seed_gives_the_same_users():
    a = FakeUsers(seed=42).batch(1, 50)
    b = FakeUsers(seed=42).batch(1, 50)
    c = FakeUsers(seed=43).batch(1, 50)
    assert a == b
    assert a != c


def test_rerun_adds_users_without_collisions(run):
    run("populate_fake_user_bulk", "200", "--seed", "5")
    run("populate_fake_user_bulk", "200", "--seed", "5")
    assert User.objects.count() == 400
    assert User.objects.values("username").distinct().count() == 400
    assert User.objects.annotate(e=Lower("email")).values("e").distinct().count() == 400


def test_dirty_rows_are_written_and_counted_by_kind(run):
    out, _ = run("populate_fake_user_bulk", "2000", "--dirty", "0.2", "--seed", "3")
    counts = {kind: int(re.search(rf"{kind}: (\d+)", out).group(1)) for kind in DEFECT_KINDS}
    assert all(n > 0 for n in counts.values()), counts
    assert 250 < sum(counts.values()) < 550
    assert User.objects.filter(email="").count() == counts["email_empty"]
    assert User.objects.filter(email__startswith="  ").count() == counts["email_whitespace"]
    exact_dups = (
        User.objects.exclude(email="").values("email").annotate(n=Count("id")).filter(n__gt=1)
    )
    assert exact_dups.count() >= counts["email_duplicate"] * 0.9
    assert User.objects.filter(phone_number__contains="-").exists()
    assert all(len(p) <= 15 for p in User.objects.values_list("phone_number", flat=True))


@pytest.mark.parametrize(
    "args, message",
    [
        (["0"], "greater than 0"),
        (["-5"], "greater than 0"),
        (["many"], "is not a whole number"),
        (["10", "--dirty", "1.5"], "between 0 and 1"),
        (["10", "--dirty", "lots"], "is not a number"),
        (["10", "--batch-size", "0"], "greater than 0"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(run, args, message):
    with pytest.raises(CommandError, match=message):
        run("populate_fake_user_bulk", *args)
    assert User.objects.count() == 0


@pytest.mark.slow
@pytest.mark.parametrize("args", [["abc"], ["10", "--frobnicate"], []])
def test_bad_command_lines_end_in_one_line_without_traceback(args):
    proc = manage("populate_fake_user_bulk", *args)
    assert_clean_failure(proc, "populate_fake_user_bulk: error: ", "--help")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_unmigrated_database_is_refused_in_one_line(fresh_database_url):
    proc = manage("populate_fake_user_bulk", "10", url=fresh_database_url)
    assert_clean_failure(proc, "populate_fake_user_bulk: error: ", "migrate account 0001")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_verbosity_0_prints_nothing_on_success_even_when_it_migrates(fresh_database_url):
    proc = manage("populate_fake_user_bulk", "20", "--migrate", "-v", "0", url=fresh_database_url)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")


def test_verbosity_0_prints_nothing_on_success(run):
    out, err = run("populate_fake_user_bulk", "20", "--dirty", "0.5", verbosity=0)
    assert (out, err) == ("", "")
    assert User.objects.count() == 20


@pytest.mark.slow
def test_demo_prints_a_staff_account_that_can_sign_in(fresh_database_url, tmp_path):
    demo = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        cwd=ROOT, env=subprocess_env(fresh_database_url, BACKUP_DIR=tmp_path, REPORT_DIR=tmp_path),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    username = re.search(r"sign in at \S+ as (\S+) / legacy-password", demo.stdout).group(1)
    check = manage(
        "shell", "--no-imports", "-c",
        "from django.contrib.auth import authenticate; "
        f"u = authenticate(username={username!r}, password='legacy-password'); "
        "print(u is not None and u.is_staff and u.is_active)",
        url=fresh_database_url,
    )  # fmt: skip
    assert check.stdout.strip() == "True", check.stdout + check.stderr


def _fail_on_batch(monkeypatch, n, exc):
    real = populate_module.insert_rows
    calls = {"n": 0}

    def insert(model, columns, rows):
        calls["n"] += 1
        if calls["n"] == n:
            real(model, columns, rows[: len(rows) // 2])  # half a batch reaches the database...
            raise exc  # ...then the batch fails
        return real(model, columns, rows)

    monkeypatch.setattr(populate_module, "insert_rows", insert)


@pytest.mark.django_db(transaction=True)
def test_failed_batch_is_rolled_back_and_reported(run, monkeypatch):
    _fail_on_batch(monkeypatch, 3, DatabaseError("disk full"))
    with pytest.raises(CommandError, match="200 users were committed before it"):
        run("populate_fake_user_bulk", "500", "--batch-size", "100")
    assert User.objects.count() == 200


@pytest.mark.django_db(transaction=True)
def test_interrupted_run_keeps_whole_batches_only(run, monkeypatch):
    _fail_on_batch(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(CommandError, match="Interrupted: 100 users were committed"):
        run("populate_fake_user_bulk", "500", "--batch-size", "100")
    assert User.objects.count() == 100


@pytest.mark.slow
def test_migrate_flag_prepares_an_empty_database_and_never_goes_back(fresh_database_url):
    proc = manage("populate_fake_user_bulk", "50", "--migrate", url=fresh_database_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = manage("showmigrations", "account", url=fresh_database_url).stdout
    assert "[X] 0001_initial" in shown and "[ ] 0002_copy_legacy_users" in shown
    assert manage("migrate", url=fresh_database_url, USER_COPY_SKIP_INVALID="on").returncode == 0
    # Past 0001 (users copied): populate adds legacy users and leaves the schema alone.
    proc = manage("populate_fake_user_bulk", "50", "--migrate", url=fresh_database_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "[X] 0002_copy_legacy_users"
        in manage("showmigrations", "account", url=fresh_database_url).stdout
    )
    resync = manage("copy_users", url=fresh_database_url)
    assert "Inserted 50" in resync.stdout, resync.stdout + resync.stderr
