"""Backup and restore: exact round trip, refusals that leave the database untouched."""

import gzip
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from django.contrib.auth import authenticate
from django.core.management.base import CommandError

from account.backup import backed_up_models
from account.dbutil import insert_rows
from account.fakedata import COLUMNS, FakeUsers
from account.models import Activity, Address, NewUser, Notification, User

from .conftest import ROOT, assert_clean_failure, subprocess_env

pytestmark = pytest.mark.django_db


def everything():
    """Every row of every backed-up table, every column, ordered by primary key."""
    return {
        m._meta.db_table: list(
            m.objects.order_by("pk").values_list(*[f.attname for f in m._meta.concrete_fields])
        )
        for m in backed_up_models()
    }


def wipe():
    for model in reversed(backed_up_models()):
        model.objects.all().delete()


@pytest.fixture
def populated(run, dirty_legacy, settings):
    run("populate_fake_user_bulk", "300", "--dirty", "0.2", "--seed", "9", "--password", "pw")
    run("copy_users", "--skip-invalid")
    user = NewUser.objects.get(pk=dirty_legacy["admin"].pk)
    Address.objects.create(
        user=user, street_address="Thamel 5", city="Kathmandu", postal_code="44600"
    )
    Activity.objects.create(user=user, activity_type="login")
    Notification.objects.create(
        user=user, message_body="Welcome to the new schema\nline two \u2603"
    )
    return dirty_legacy


def backup_file(run, *args):
    out, _ = run("backup_accounts", *args)
    return Path(out.split(", ")[-1].split(" (")[0]) if "--output" not in args else None


@pytest.mark.parametrize("gzip_it", [True, False])
def test_round_trip_is_exact_and_users_still_log_in(run, populated, settings, gzip_it):
    before = everything()
    assert before["account_newuser"] and before["account_address"]
    out, _ = run("backup_accounts", *([] if gzip_it else ["--no-gzip"]))
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    assert path.name.endswith(".jsonl.gz" if gzip_it else ".jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "rows/s" in out and "MB" in out
    wipe()
    assert NewUser.objects.count() == 0
    out, _ = run("restore_accounts", str(path))
    assert "Restored" in out
    assert everything() == before  # field for field, timestamps to the microsecond
    admin = NewUser.objects.get(pk=populated["admin"].pk)
    assert admin.last_login.microsecond == 123456
    user = populated["clean"][3]
    assert authenticate(username=user.username, password="old-secret").pk == user.pk
    # Sequences were reset: a new signup gets a fresh id.
    assert NewUser.objects.create_user("after", "after@example.com", "pw").pk > admin.pk


def test_manifest_describes_the_file(run, populated, settings):
    run("backup_accounts")
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    with gzip.open(path) as f:
        manifest = orjson.loads(f.readline())
        lines = sum(1 for _ in f)
    assert manifest["format"] == "account-backup" and manifest["version"] == 1
    assert "0002_copy_legacy_users" in manifest["migrations"]["account"]
    assert sum(t["rows"] for t in manifest["tables"].values()) == lines
    assert manifest["tables"]["account_user"]["rows"] == User.objects.count()
    assert len(manifest["sha256"]) == 64


def test_backups_never_overwrite(run, populated, settings, tmp_path):
    target = tmp_path / "mine.jsonl.gz"
    run("backup_accounts", "--output", str(target))
    size = target.stat().st_size
    with pytest.raises(CommandError, match="already exists"):
        run("backup_accounts", "--output", str(target))
    assert target.stat().st_size == size
    run("backup_accounts")
    run("backup_accounts")
    assert len(list(Path(settings.BACKUP_DIR).glob("accounts-*"))) == 2


def _corrupt_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x55
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 4])


def _rewrite_manifest(path, change):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        manifest = orjson.loads(f.readline())
        rest = f.read()
    change(manifest)
    with opener(path, "wb") as f:
        f.write(orjson.dumps(manifest) + b"\n" + rest)


def _other_version(path):
    _rewrite_manifest(path, lambda manifest: manifest.update(version=2))


def _foreign(path):
    path.write_bytes(b'{"model": "auth.user", "pk": 1}\n')


@pytest.mark.parametrize(
    "damage, message",
    [
        (_corrupt_byte, "corrupted or truncated"),
        (_truncate, "corrupted or truncated"),
        (_other_version, "format version 2"),
        (_foreign, "not an account backup"),
        (lambda p: p.unlink(), "No backup file"),
    ],
)
@pytest.mark.parametrize("gzip_it", [True, False])
def test_damaged_backups_are_refused_and_the_database_is_untouched(
    run, populated, settings, damage, message, gzip_it
):
    run("backup_accounts", *([] if gzip_it else ["--no-gzip"]))
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    damage(path)
    wipe()
    NewUser.objects.create_user("survivor", "survivor@example.com", "pw")
    before = everything()
    with pytest.raises(CommandError, match=message):
        run("restore_accounts", str(path), "--replace")
    assert everything() == before


def test_restore_refuses_tables_with_rows_unless_replace(run, populated, settings):
    run("backup_accounts")
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    before = everything()
    with pytest.raises(CommandError, match="already hold rows.*--replace"):
        run("restore_accounts", str(path))
    NewUser.objects.filter(username="padded").update(full_name="Changed Since")
    out, _ = run("restore_accounts", str(path), "--replace", "--dry-run")
    assert "Nothing was written" in out and "account_newuser:" in out
    assert NewUser.objects.get(username="padded").full_name == "Changed Since"
    run("restore_accounts", str(path), "--replace")
    assert everything() == before


def test_restore_refuses_a_database_at_another_migration(run, populated, settings):
    run("backup_accounts")
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    _rewrite_manifest(
        path, lambda manifest: manifest["migrations"].update(account=["0001_initial"])
    )
    wipe()
    with pytest.raises(CommandError, match="migrate this database to the same point first"):
        run("restore_accounts", str(path))


@pytest.mark.slow
def test_restore_script_exits_non_zero_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("garbage\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "restore.py"), str(bad)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert_clean_failure(proc, "not a readable account backup")


@pytest.mark.slow
def test_backup_with_the_database_down_exits_non_zero_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "backup.py"), "--dir", str(tmp_path)],
        env=subprocess_env("postgres://postgres@127.0.0.1:1/nowhere"),
        capture_output=True,
        text=True,
    )
    assert_clean_failure(proc, "Database error")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_killed_backup_leaves_no_file_under_a_final_name(tmp_path):
    insert_rows(User, COLUMNS, FakeUsers(seed=1).batch(1, 60_000))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "backup.py"), "--dir", str(tmp_path)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert proc.poll() is None, "the backup finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    partial = next(p for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    assert stat.S_IMODE(os.stat(partial).st_mode) == 0o600
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
