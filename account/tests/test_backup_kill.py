"""A backup or a restore killed with SIGKILL mid-way, at 100,000 users: nothing changed, nothing
readable by others left behind, and the next run succeeds.

Mid-way, deterministically: each test runs the script at verbosity 2, waits for its first
progress line (10% of the rows written), kills it at once, and checks it was killed by the
signal before it could finish.
"""

import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth.models import Group

from account.dbutil import insert_rows
from account.fakedata import COLUMNS, FakeUsers
from account.models import OperationLog, User

from .backup_helpers import fingerprint
from .conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

USERS = 100_000


@pytest.fixture
def many_users(db):
    insert_rows(User, COLUMNS, FakeUsers(seed=1).batch(1, USERS))
    group = Group.objects.create(name="editors")
    group.legacy_user_set.add(*User.objects.order_by("pk")[:100])


def kill_at_first_progress_line(script, *args, label) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / script), *args, "-v", "2"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith(f"  {label}: "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read() + proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return proc


def readable_by_others(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if stat.S_IMODE(p.stat().st_mode) & 0o077]


def run_script(script, *args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_a_killed_backup_leaves_only_a_private_partial_file_the_next_backup_removes(
    many_users, tmp_path
):
    before = fingerprint()
    kill_at_first_progress_line("backup.py", "--dir", str(tmp_path), label="backup")
    left = list(tmp_path.iterdir())
    assert [p.name for p in left if not p.name.startswith(".")] == []  # no final name
    assert [p.name.endswith(".jsonl.gz.partial") for p in left] == [True]  # caught mid-way
    assert readable_by_others(tmp_path) == []
    assert fingerprint() == before
    assert not OperationLog.objects.exists()

    run_script("backup.py", "--dir", str(tmp_path))
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("accounts-") and readable_by_others(tmp_path) == []


def test_a_killed_restore_changes_nothing_and_the_next_restore_succeeds(many_users, run, tmp_path):
    path = tmp_path / "backup.jsonl.gz"
    run("backup_accounts", "--output", str(path))
    backed_up = fingerprint()
    User.objects.filter(pk__gt=USERS - 1000).delete()
    User.objects.filter(pk=1).update(full_name="Changed Since")
    changed = fingerprint()

    kill_at_first_progress_line("restore.py", str(path), "--replace", label="restore")
    assert fingerprint() == changed
    assert list(tmp_path.iterdir()) == [path] and readable_by_others(tmp_path) == []

    run_script("restore.py", str(path), "--replace")
    assert fingerprint() == backed_up
