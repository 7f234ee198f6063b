"""Each kind of wrong value the verification exists to catch, planted in what the sync writes.

Every test corrupts one value the sync's write step left in the new tables and expects the
whole sync to be rolled back. A verifier that checks too little (usernames only, say) fails
these tests.
"""

from datetime import UTC, date, datetime

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management.base import CommandError
from django.db import connection
from django.db.models.functions import Lower

from account import usercopy
from account.models import NewUser, OperationLog, Profile, User

from .conftest import make_legacy

pytestmark = pytest.mark.django_db


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


def plant(monkeypatch, corrupt, step="write_rows"):
    """Let one step of the sync run (its write, by default), then `corrupt()` what it wrote,
    before verification.

    `corrupt` changes rows with queryset updates, which leave `updated_at` as the sync set
    it: the rows still look like this run's writes.
    """
    real = getattr(usercopy.Sync, step)

    def corrupting(self, *args):
        real(self, *args)
        corrupt()

    monkeypatch.setattr(usercopy.Sync, step, corrupting)


def second(**values):
    """A corruption: set `values` on the copy of the second legacy user."""
    return lambda: NewUser.objects.filter(username="user1").update(**values)


def assert_rolled_back(run, match, *args):
    with pytest.raises(CommandError, match=f"Verification failed.*{match}"):
        run("copy_users", *args)
    assert NewUser.objects.count() == 0 and Profile.objects.count() == 0
    assert OperationLog.objects.get(kind="copy").ok is False


def test_a_wholly_lowercased_email_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, second(email=Lower("email")))
    assert_rolled_back(run, "emails differ")


def test_a_wrong_phone_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, second(phone_number="+9779841234599"))
    assert_rolled_back(run, "phone numbers differ")


def test_the_email_and_phone_check_reads_past_the_first_batch(run, legacy_users, monkeypatch):
    """The emails and phones are checked in Python, streamed in batches of --batch-size."""
    last = legacy_users[-1].pk
    plant(
        monkeypatch,
        lambda: NewUser.objects.filter(pk=last).update(
            email=Lower("email"), phone_number="+9779841234599"
        ),
    )
    assert_rolled_back(
        run, rf"emails differ for new users \[{last}\].*phone numbers differ for new users "
        rf"\[{last}\]", "--batch-size", "1",
    )  # fmt: skip


def test_the_sync_streams_in_batches_of_batch_size(run, legacy_users, monkeypatch):
    """Both streams through Python, the check and the verification, fetch --batch-size rows
    at a time: that bounds the sync's memory."""
    sizes, chunked_cursor = [], connection.chunked_cursor

    class Recording:
        def __init__(self):
            self.cursor = chunked_cursor()

        def __enter__(self):
            self.cursor.__enter__()
            return self

        def __exit__(self, *exc):
            return self.cursor.__exit__(*exc)

        def fetchmany(self, size):
            sizes.append(size)
            return self.cursor.fetchmany(size)

        def __getattr__(self, name):
            return getattr(self.cursor, name)

    monkeypatch.setattr(connection, "chunked_cursor", Recording)
    run("copy_users", "--batch-size", "2")
    assert NewUser.objects.count() == 3
    assert sizes == [2] * 6  # each stream: 2 rows, 1 row, then an empty fetch


def test_dropped_microseconds_are_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, second(last_login=datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)))
    assert_rolled_back(run, "fields differ")


def test_a_changed_password_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, second(password="md5$other$hash"))
    assert_rolled_back(run, "fields differ")


def test_a_changed_flag_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, second(is_staff=False))
    assert_rolled_back(run, "fields differ")


def test_a_missing_link_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, lambda: NewUser.groups.through.objects.all().delete())
    assert_rolled_back(run, "groups differ")


def test_an_extra_link_is_caught(run, legacy_users, monkeypatch):
    other = Permission.objects.get(codename="view_newuser")
    plant(
        monkeypatch,
        lambda: NewUser.user_permissions.through.objects.create(
            newuser_id=legacy_users[0].pk, permission=other
        ),
    )
    assert_rolled_back(run, "user_permissions differ")


def test_a_wrong_value_carried_by_an_update_is_caught(run, legacy_users, monkeypatch):
    run("copy_users")
    User.objects.filter(pk=legacy_users[1].pk).update(full_name="Renamed")
    plant(monkeypatch, second(full_name="Wrong"))
    with pytest.raises(CommandError, match="Verification failed.*fields differ"):
        run("copy_users")
    assert NewUser.objects.get(pk=legacy_users[1].pk).full_name == "User1"


def test_a_wrong_date_of_birth_is_caught(run, legacy_users, monkeypatch):
    plant(monkeypatch, second(date_of_birth=date(1990, 1, 1)))
    assert_rolled_back(run, "fields differ")


@pytest.mark.parametrize("flag", [{"is_active": False}, {"is_superuser": True}])
def test_a_changed_active_or_superuser_flag_is_caught(run, legacy_users, monkeypatch, flag):
    plant(monkeypatch, second(**flag))
    assert_rolled_back(run, "fields differ")


def test_a_lost_user_is_caught(run, legacy_users, monkeypatch):
    def lose_user0():
        """As if the write had skipped user0's row (and so made it no profile either)."""
        NewUser.objects.filter(username="user0").delete()
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {usercopy.VALUES} WHERE username = 'user0'")

    plant(monkeypatch, lose_user0)
    assert_rolled_back(run, "2 new users written, 3 expected")


def test_a_missing_profile_is_caught(run, legacy_users, monkeypatch):
    plant(
        monkeypatch,
        lambda: Profile.objects.filter(user__username="user0").delete(),
        step="create_profiles",
    )
    assert_rolled_back(run, "2 profiles for 3 inserted users")


def test_a_deleted_user_left_on_the_new_side_is_caught(run, legacy_users, monkeypatch):
    run("copy_users")
    gone = legacy_users[0]
    User.objects.filter(pk=gone.pk).delete()
    plant(
        monkeypatch,
        lambda: NewUser.objects.create(pk=gone.pk, username="user0", email="user0@example.com"),
        step="delete_removed",
    )
    with pytest.raises(CommandError, match="Verification failed.*deleted users still"):
        run("copy_users")
    assert NewUser.objects.filter(pk=gone.pk).exists()  # as the first sync left it
    assert NewUser.objects.count() == 3
