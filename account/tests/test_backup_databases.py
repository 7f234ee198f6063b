"""Backups restored into other databases: other permission ids, never or half migrated."""

import json
import sqlite3
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType

from account.models import Address, NewUser, User

from .backup_helpers import permission_ids, rights
from .conftest import ROOT, assert_clean_failure, make_legacy, manage

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def shell(url, code):
    proc = manage("shell", "-v", "0", "-c", code, url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def migrate(url, *args):
    proc = manage("migrate", *args, "-v", "0", url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def tables_in(url) -> set[str]:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {name for (name,) in rows}
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {name for (name,) in rows}


@pytest.fixture
def with_rights(db):
    """Users with rights of every kind: direct permissions, groups, admin log entries."""
    legacy = make_legacy("legacy", "legacy@example.com")
    user = NewUser.objects.create_user("staff", "staff@example.com", "pw", is_staff=True)
    editors = Group.objects.create(name="editors")
    editors.permissions.add(*Permission.objects.filter(codename__in=["view_address", "add_user"]))
    Group.objects.create(name="nobody")
    for who in (legacy, user):
        who.groups.add(editors)
        who.user_permissions.add(Permission.objects.get(codename="view_newuser"))
    for model in (Address, User, NewUser):
        LogEntry.objects.create(
            user=user,
            content_type=ContentType.objects.get_for_model(model),
            object_repr=model.__name__,
            action_flag=ADDITION,
        )


@pytest.fixture
def backup_file(run, settings, with_rights) -> Path:
    run("backup_accounts")
    return next(Path(settings.BACKUP_DIR).glob("accounts-*"))


def test_rights_survive_a_restore_into_a_database_with_other_permission_ids(
    backup_file, fresh_database_url
):
    url = fresh_database_url
    migrate(url)
    shell(url, "from account.tests.backup_helpers import reverse_ids; reverse_ids()")
    theirs = json.loads(
        shell(url, "from account.tests.backup_helpers import print_permission_ids as p; p()")
    )
    ours = permission_ids()
    assert theirs.keys() == ours.keys()
    assert all(theirs[key] != ours[key] for key in ours)  # every id names another permission
    proc = manage("restore_accounts", str(backup_file), url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restored = json.loads(
        shell(url, "from account.tests.backup_helpers import print_rights as p; p()")
    )
    assert restored == json.loads(json.dumps(rights()))
    assert len(restored) == 3 and len(restored["admin log"]) == 3


def test_a_permission_missing_from_the_target_is_refused_before_writing(
    backup_file, fresh_database_url
):
    url = fresh_database_url
    migrate(url)
    shell(url, "from django.contrib.auth.models import Permission as P; "
               "P.objects.filter(codename='add_user').delete()")  # fmt: skip
    proc = manage("restore_accounts", str(backup_file), url=url)
    assert_clean_failure(proc, "this database does not have (account.user.add_user)")
    assert shell(url, "from account.models import NewUser; print(NewUser.objects.count())") == "0\n"


# The states a database can be in before `make migrate`: never migrated, auth only (another
# project's first steps), and the legacy schema only (what `make populate` leaves).
NEVER, AUTH_ONLY, LEGACY_ONLY = [], ["auth"], ["account", "0001"]


@pytest.mark.parametrize("state", [NEVER, AUTH_ONLY], ids=["never migrated", "auth only"])
def test_backup_of_an_unmigrated_database_is_refused_in_one_line(fresh_database_url, state):
    if state:
        migrate(fresh_database_url, *state)
    tables = tables_in(fresh_database_url)
    proc = manage("backup_accounts", "--dir", "/nonexistent/never-created", url=fresh_database_url)
    assert_clean_failure(proc, "Nothing to back up", "python manage.py migrate")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert tables_in(fresh_database_url) == tables
    assert not Path("/nonexistent/never-created").exists()


@pytest.mark.parametrize(
    "state", [NEVER, AUTH_ONLY, LEGACY_ONLY], ids=["never migrated", "auth only", "legacy only"]
)
def test_restore_into_an_unmigrated_database_is_refused_in_one_line(
    backup_file, fresh_database_url, state
):
    if state:
        migrate(fresh_database_url, *state)
    tables = tables_in(fresh_database_url)
    proc = manage("restore_accounts", str(backup_file), url=fresh_database_url)
    latest = max(p.stem for p in (ROOT / "account" / "migrations").glob("0*.py"))
    assert_clean_failure(proc, f"python manage.py migrate account {latest}")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert tables_in(fresh_database_url) == tables
    dry = manage("restore_accounts", str(backup_file), "--dry-run", url=fresh_database_url)
    assert_clean_failure(dry, "Dry run: a restore would refuse: The backup was made at account")
    assert dry.returncode == 1
    assert "A restore would refuse" in dry.stdout


def test_a_legacy_only_database_backs_up_and_restores_without_an_admin_log(
    fresh_database_url, tmp_path
):
    url = fresh_database_url
    proc = manage("populate_fake_user_bulk", "50", "--migrate", "-v", "0", url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "django_admin_log" not in tables_in(url)
    path = tmp_path / "legacy.jsonl.gz"
    proc = manage("backup_accounts", "--output", str(path), url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = manage("restore_accounts", str(path), "--replace", url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert shell(url, "from account.models import User; print(User.objects.count())") == "50\n"


# Restoring as a database role that may read and write the tables but does not own them
# (what a production app's role often is): it cannot drop and rebuild indexes (ALTER TABLE).


@pytest.fixture
def role(fresh_database_url):
    """make(*grants) -> the URL of a new login role given `grants` in the fresh database."""
    if fresh_database_url.startswith("sqlite"):
        pytest.skip("roles are PostgreSQL's")
    name = f"dml_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(fresh_database_url)
    as_role = parts._replace(netloc=f"{name}@{parts.netloc.rpartition('@')[2]}").geturl()
    made = []

    def make(*grants):
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{name}" LOGIN')
            for grant in grants:
                conn.execute(f'GRANT {grant} TO "{name}"')
        made.append(name)
        return as_role

    yield make
    if made:
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{name}"')  # its grants in this database
            conn.execute(f'DROP ROLE "{name}"')


READ_WRITE = "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"


def count_new_users(url) -> str:
    return shell(url, "from account.models import NewUser; print(NewUser.objects.count())")


def test_a_role_that_may_not_move_the_id_sequences_is_refused_before_writing(
    backup_file, fresh_database_url, role
):
    migrate(fresh_database_url)
    url = role(READ_WRITE, "USAGE ON ALL SEQUENCES IN SCHEMA public")
    dry = manage("restore_accounts", str(backup_file), "--dry-run", url=url)
    assert_clean_failure(dry, "may not move the id sequences of auth_group", "GRANT USAGE, UPDATE")
    proc = manage("restore_accounts", str(backup_file), url=url)
    assert_clean_failure(proc, "may not move the id sequences of auth_group")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert count_new_users(fresh_database_url) == "0\n"


def test_a_role_that_does_not_own_the_tables_restores_through_the_indexes(
    backup_file, fresh_database_url, role
):
    migrate(fresh_database_url)
    url = role(READ_WRITE, "USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA public")
    dry = manage("restore_accounts", str(backup_file), "--dry-run", url=url)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "does not own account_user" in dry.stdout
    proc = manage("restore_accounts", str(backup_file), url=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restored = json.loads(
        shell(fresh_database_url, "from account.tests.backup_helpers import print_rights as p; p()")
    )
    assert restored == json.loads(json.dumps(rights()))


def test_a_role_that_may_not_write_the_tables_is_refused_in_one_line(
    backup_file, fresh_database_url, role
):
    migrate(fresh_database_url)
    url = role("SELECT ON ALL TABLES IN SCHEMA public")
    proc = manage("restore_accounts", str(backup_file), url=url)
    assert_clean_failure(proc, "may not INSERT auth_group, INSERT auth_group_permissions")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
