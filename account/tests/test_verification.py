"""Each kind of wrong value the verification exists to catch, planted in what the sync writes.

Every test corrupts one value on its way into the new tables and expects the whole sync to be
rolled back. A verifier that checks too little (usernames only, say) fails these tests.
"""

from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management.base import CommandError

from account import usercopy
from account.models import NewUser, OperationLog, Profile, User

from .conftest import make_legacy

pytestmark = pytest.mark.django_db
FIELDS = usercopy.INSERT_FIELDS


@pytest.fixture
def legacy_users():
    group = Group.objects.create(name="editors")
    perm = Permission.objects.get(codename="view_address")
    users = [
        make_legacy(
            f"user{i}", f"User{i}@Example.com", phone="984-123-456" + str(i),
            last_login=datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC),
            is_staff=i == 1,
        )
        for i in range(3)
    ]  # fmt: skip
    users[1].groups.add(group)
    users[1].user_permissions.add(perm)
    return users


def plant(monkeypatch, change_user=None, change_links=None):
    """Corrupt the second user row (or the link rows) that the sync hands to the writer."""
    real = usercopy.insert_rows

    def corrupting(model, columns, rows, alias):
        rows = list(rows)
        if model is NewUser and change_user:
            row = dict(zip(FIELDS, rows[1], strict=True))
            change_user(row)
            rows[1] = tuple(row[f] for f in FIELDS)
        elif model is not NewUser and change_links:
            rows = change_links(model, rows)
        return real(model, columns, rows, alias)

    monkeypatch.setattr(usercopy, "insert_rows", corrupting)


def assert_rolled_back(run, match):
    with pytest.raises(CommandError, match=f"Verification failed.*{match}"):
        run("copy_users")
    assert NewUser.objects.count() == 0 and Profile.objects.count() == 0
    assert OperationLog.objects.get(kind="copy").ok is False


def test_a_wholly_lowercased_email_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, lambda row: row.update(email=row["email"].lower()))
    assert_rolled_back(run, "emails differ")


def test_a_wrong_phone_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, lambda row: row.update(phone_number="+9779841234599"))
    assert_rolled_back(run, "phone numbers differ")


def test_dropped_microseconds_are_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, lambda row: row.update(last_login=row["last_login"].replace(microsecond=0)))
    assert_rolled_back(run, "fields differ")


def test_a_changed_password_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, lambda row: row.update(password="md5$other$hash"))
    assert_rolled_back(run, "fields differ")


def test_a_changed_flag_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, lambda row: row.update(is_staff=not row["is_staff"]))
    assert_rolled_back(run, "fields differ")


def test_a_missing_link_is_caught(run, legacy_users, monkeypatch):
    plant(
        monkeypatch,
        change_links=lambda model, rows: rows[1:] if "groups" in model._meta.db_table else rows,
    )
    assert_rolled_back(run, "groups differ")


def test_an_extra_link_is_caught(run, legacy_users, monkeypatch):
    other = Permission.objects.get(codename="view_newuser")

    def add(model, rows):
        if "permissions" in model._meta.db_table:
            rows = [*rows, (legacy_users[0].pk, other.pk)]
        return rows

    plant(monkeypatch, change_links=add)
    assert_rolled_back(run, "user_permissions differ")


def test_a_wrong_value_carried_by_an_update_is_caught(run, legacy_users, monkeypatch):
    run("copy_users")
    User.objects.filter(pk=legacy_users[1].pk).update(full_name="Renamed")
    real = usercopy.update_rows

    def corrupting(model, columns, rows, alias):
        rows = [(*row[:6], "Wrong", *row[7:]) for row in rows]
        return real(model, columns, rows, alias)

    monkeypatch.setattr(usercopy, "update_rows", corrupting)
    with pytest.raises(CommandError, match="Verification failed.*fields differ"):
        run("copy_users")
    assert NewUser.objects.get(pk=legacy_users[1].pk).full_name == "User1"
