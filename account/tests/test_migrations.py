"""The migration layout works on a fresh database, forwards, backwards and piecemeal."""

import pytest

from .conftest import manage

pytestmark = pytest.mark.slow


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_migrate_admin_alone_on_a_fresh_database(fresh_database_url):
    ok(manage("migrate", "admin", url=fresh_database_url))
    assert "[X] 0001_initial" in ok(manage("showmigrations", "account", url=fresh_database_url))


def test_migrate_account_to_zero_and_forward_again(fresh_database_url):
    ok(manage("migrate", url=fresh_database_url))
    ok(manage("migrate", "account", "zero", url=fresh_database_url))
    ok(manage("migrate", url=fresh_database_url))
    shown = ok(manage("showmigrations", "account", url=fresh_database_url))
    assert "[X] 0002_copy_legacy_users" in shown


def test_models_and_migrations_agree(fresh_database_url):
    ok(manage("makemigrations", "--check", "--dry-run", url=fresh_database_url))
