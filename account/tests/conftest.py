"""Fixtures shared by the tests: subprocess runners against the test database, legacy data."""

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from urllib.parse import quote

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.db import connection

from account.fakedata import FakeUsers
from account.models import User

ROOT = Path(__file__).resolve().parents[2]


def database_url(settings_dict) -> str:
    """The URL of a database Django is connected to, for subprocesses."""
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    user = quote(settings_dict["USER"] or "")
    password = f":{quote(settings_dict['PASSWORD'])}" if settings_dict["PASSWORD"] else ""
    host = settings_dict["HOST"] or "127.0.0.1"
    port = f":{settings_dict['PORT']}" if settings_dict["PORT"] else ""
    return f"postgres://{user}{password}@{host}{port}/{settings_dict['NAME']}"


def subprocess_env(url: str | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE"}}
    env.update(
        DJANGO_SETTINGS_MODULE="config.test_settings",
        DATABASE_URL=url if url is not None else database_url(connection.settings_dict),
        PYTHONUNBUFFERED="1",
        READ_DOT_ENV="off",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def manage(*args, url=None, timeout=300, env=None, **extra):
    """Run `manage.py ARGS` in a subprocess, as Make does; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env or subprocess_env(url, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_as_group(args, *, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, timeout=timeout), except that the
    command runs in a session of its own and a timeout kills its whole process group: `make up`
    and the `docker compose up` it started, not only make. (subprocess.run kills the first
    process alone, then waits for ever on the output pipes the survivors hold open.) The output
    goes through files, which nothing left behind can block."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            args, stdout=out, stderr=err, start_new_session=True, **popen_kwargs
        )
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        stdout, stderr = (_read_from_start(file) for file in (out, err))
    if timed_out:
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _read_from_start(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def assert_clean_failure(proc, *fragments):
    """Non-zero exit, the message present, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output


@pytest.fixture
def run(settings, tmp_path):
    """call_command with captured output; returns (stdout, stderr)."""
    settings.REPORT_DIR = tmp_path / "reports"
    settings.BACKUP_DIR = tmp_path / "backups"

    def _run(*args, **kwargs):
        out, err = StringIO(), StringIO()
        call_command(*args, stdout=out, stderr=err, **kwargs)
        return out.getvalue(), err.getvalue()

    return _run


@pytest.fixture
def fresh_database_url(tmp_path):
    """A new, empty database of the same kind as the test database; dropped afterwards."""
    settings_dict = connection.settings_dict
    if settings_dict["ENGINE"].endswith("sqlite3"):
        yield f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        return
    import psycopg

    name = f"fresh_{uuid.uuid4().hex[:12]}"
    admin_url = database_url({**settings_dict, "NAME": "postgres"})
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url({**settings_dict, "NAME": name})
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_legacy(username, email, phone="9841234567", **fields):
    fields.setdefault("password", "md5$salt$notarealhash")
    fields.setdefault("full_name", username.title())
    return User.objects.create(username=username, email=email, phone_number=phone, **fields)


@pytest.fixture
def dirty_legacy(db):
    """Every defect kind `populate --dirty` makes, plus clean users with groups, perms, last_login.

    Returns a dict of the interesting rows by role.
    """
    rows = FakeUsers(seed=7, password="old-secret").batch(1, 30)
    cols = ("password", "is_superuser", "username", "email", "full_name", "date_of_birth",
            "phone_number", "is_active", "is_staff")  # fmt: skip
    users = [User.objects.create(**dict(zip(cols, row, strict=True))) for row in rows]
    admin = users[0]
    admin.is_superuser = admin.is_staff = True
    admin.last_login = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)
    admin.save()
    group = Group.objects.create(name="editors")
    admin.groups.add(group)
    perm = Permission.objects.get(codename="view_newuser")
    admin.user_permissions.add(perm)
    users[1].last_login = datetime(2023, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    users[1].save()
    bad = {
        "dup_a": make_legacy("dup_a", "same@example.com"),
        "dup_b": make_legacy("dup_b", "same@example.com"),
        "case_a": make_legacy("case_a", "Case@Example.org"),
        "case_b": make_legacy("case_b", "case@example.org"),
        "empty": make_legacy("empty_email", ""),
        "malformed": make_legacy("malformed", "not-an-email"),
        "garbage_phone": make_legacy("garbage", "garbage@example.com", phone="call me"),
        "short_phone": make_legacy("shortphone", "short@example.com", phone="12345"),
        "indian_phone": make_legacy("indian", "indian@example.com", phone="9123456789"),
        "bad_username": make_legacy("has space", "space@example.com"),
    }
    normalised = {
        "padded": make_legacy("padded", "  padded@Example.COM "),
        "dashes": make_legacy("dashes", "dashes@example.com", phone="984-123-4567"),
        "spaces": make_legacy("spaces", "spaces@example.com", phone="984 123 4567"),
        "zero": make_legacy("zero", "zero@example.com", phone="09841234567"),
        "plus977": make_legacy("plus977", "plus977@example.com", phone="+9779841234567"),
        "foreign": make_legacy("foreign", "foreign@example.com", phone="+12015550123"),
        "no_phone": make_legacy("no_phone", "nophone@example.com", phone=""),
    }
    return {"clean": users, "admin": admin, "group": group, "perm": perm, "bad": bad,
            "normalised": normalised}  # fmt: skip
