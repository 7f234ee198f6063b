"""The sync: one test per case of the README's table, plus sequences, collisions and failures."""

import csv
from datetime import UTC, datetime

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import authenticate
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission
from django.core.management.base import CommandError
from django.db import connection

from account import usercopy
from account.models import Address, NewUser, OperationLog, Profile, SyncState, User

from .conftest import make_legacy

pytestmark = pytest.mark.django_db


@pytest.fixture
def synced(run):
    """Two legacy users copied by a first sync; returns them (legacy rows)."""
    alice = make_legacy("alice", "alice@example.com", password=make_password("old-pass"))
    bob = make_legacy("bob", "bob@example.com", phone="9851234567")
    run("copy_users")
    assert NewUser.objects.count() == 2
    return alice, bob


def report_of(message_or_out: str) -> dict[int, dict]:
    path = message_or_out.split("listed in ", 1)[1].split(".csv", 1)[0] + ".csv"
    with open(path, newline="") as f:
        return {int(r["legacy_id"]): r for r in csv.DictReader(f)}


def models_now():
    """The real models, as `copy_users` takes them."""
    return usercopy.CopyModels(
        legacy=User, new=NewUser, profile=Profile, state=SyncState, log=OperationLog
    )


def other_connection():
    """A second connection to the test database, committing on its own (autocommit)."""
    import psycopg

    settings = connection.settings_dict
    return psycopg.connect(
        dbname=settings["NAME"], user=settings["USER"], host=settings["HOST"],
        port=settings["PORT"] or 5432, password=settings["PASSWORD"], autocommit=True,
    )  # fmt: skip


def clean_up_after_a_transaction_test():
    User.objects.all().delete()
    NewUser.objects.all().delete()
    SyncState.objects.all().delete()
    OperationLog.objects.all().delete()


def test_a_password_changed_in_the_legacy_table_is_carried(run, synced):
    alice, _ = synced
    alice.set_password("new-pass")
    alice.save()
    run("copy_users")
    assert authenticate(username="alice", password="new-pass").pk == alice.pk
    assert authenticate(username="alice", password="old-pass") is None


def test_a_ban_and_a_demotion_are_carried(run):
    admin = make_legacy("admin", "admin@example.com", is_staff=True, is_superuser=True)
    user = make_legacy("user", "user@example.com")
    run("copy_users")
    User.objects.filter(pk=admin.pk).update(is_staff=False, is_superuser=False)
    User.objects.filter(pk=user.pk).update(is_active=False)
    run("copy_users")
    new_admin = NewUser.objects.get(pk=admin.pk)
    assert (new_admin.is_staff, new_admin.is_superuser) == (False, False)
    assert NewUser.objects.get(pk=user.pk).is_active is False


def test_email_phone_name_last_login_and_rename_are_carried(run, synced):
    alice, _ = synced
    login = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    User.objects.filter(pk=alice.pk).update(
        username="alice2", email="Alice@NEW.example.com", phone_number="985-123-4567",
        full_name="Alice Two", last_login=login,
    )  # fmt: skip
    run("copy_users")
    new = NewUser.objects.get(pk=alice.pk)
    assert (new.username, new.email, str(new.phone_number), new.full_name, new.last_login) == (
        "alice2", "Alice@new.example.com", "+9779851234567", "Alice Two", login,
    )  # fmt: skip


def test_groups_and_permissions_changed_in_the_legacy_table_are_carried(run, synced):
    alice, bob = synced
    editors = Group.objects.create(name="editors")
    perm = Permission.objects.get(codename="view_address")
    alice.groups.add(editors)
    bob.user_permissions.add(perm)
    run("copy_users")
    assert list(NewUser.objects.get(pk=alice.pk).groups.all()) == [editors]
    assert list(NewUser.objects.get(pk=bob.pk).user_permissions.all()) == [perm]
    alice.groups.remove(editors)
    run("copy_users")
    assert not NewUser.objects.get(pk=alice.pk).groups.exists()


def test_a_user_deleted_in_the_legacy_table_is_deleted_on_the_new_side(run, synced):
    alice, bob = synced
    User.objects.filter(pk=bob.pk).delete()
    out, _ = run("copy_users")
    assert "delete 1" in out
    assert not NewUser.objects.filter(pk=bob.pk).exists()
    assert not Profile.objects.filter(user_id=bob.pk).exists()
    assert not SyncState.objects.filter(pk=bob.pk).exists()
    assert NewUser.objects.filter(pk=alice.pk).exists()


def test_a_deleted_user_that_rows_point_at_is_refused_and_named(run, synced):
    _, bob = synced
    Address.objects.create(user_id=bob.pk, street_address="Durbar Marg 1", city="Kathmandu")
    User.objects.filter(pk=bob.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use: 1") as info:
        run("copy_users")
    assert "account_address" in report_of(str(info.value))[bob.pk]["detail"]
    assert NewUser.objects.filter(pk=bob.pk).exists()
    out, _ = run("copy_users", "--skip-invalid")  # leaves it and reports it
    assert "rejected, deleted_but_in_use: 1" in out
    assert NewUser.objects.filter(pk=bob.pk).exists()


def test_a_deleted_user_with_a_filled_in_profile_is_refused(run, synced):
    _, bob = synced
    Profile.objects.filter(user_id=bob.pk).update(bio="Hello")
    User.objects.filter(pk=bob.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use: 1"):
        run("copy_users")


@pytest.mark.parametrize("how", ["save", "update", "update_fields", "link"])
def test_a_change_on_the_new_side_alone_is_kept(run, synced, how):
    alice, _ = synced
    new = NewUser.objects.get(pk=alice.pk)
    if how == "save":
        new.full_name = "Changed On New"
        new.save()
    elif how == "update":
        NewUser.objects.filter(pk=alice.pk).update(full_name="Changed On New")
    elif how == "update_fields":
        new.full_name = "Changed On New"
        new.save(update_fields=["full_name"])
    else:
        new.groups.add(Group.objects.create(name="new-side"))
    out, _ = run("copy_users")
    assert "Nothing to do" in out
    new.refresh_from_db()
    assert new.full_name == "Changed On New" or new.groups.filter(name="new-side").exists()


@pytest.mark.parametrize("how", ["save", "update", "update_fields", "link", "hash_upgrade"])
def test_a_change_on_both_sides_is_a_conflict_named_by_id_and_field(run, synced, how, settings):
    alice, bob = synced
    new = NewUser.objects.get(pk=alice.pk)
    if how == "save":
        new.full_name = "New Side"
        new.save()
    elif how == "update":
        NewUser.objects.filter(pk=alice.pk).update(full_name="New Side")
    elif how == "update_fields":
        new.full_name = "New Side"
        new.save(update_fields=["full_name"])
    elif how == "link":
        new.groups.add(Group.objects.create(name="new-side"))
    else:
        # A login on the new side under a stronger first hasher re-hashes the password.
        settings.PASSWORD_HASHERS = [
            "django.contrib.auth.hashers.PBKDF2PasswordHasher",
            "django.contrib.auth.hashers.MD5PasswordHasher",
        ]
        assert authenticate(username="alice", password="old-pass").pk == alice.pk
        assert NewUser.objects.get(pk=alice.pk).password.startswith("pbkdf2_sha256$")
    User.objects.filter(pk=alice.pk).update(full_name="Legacy Side", is_staff=True)
    User.objects.filter(pk=bob.pk).update(full_name="Bob Changed")
    before = NewUser.objects.get(pk=alice.pk).__dict__.copy()
    with pytest.raises(CommandError, match="conflict: 1") as info:
        run("copy_users")
    line = report_of(str(info.value))[alice.pk]
    assert line["reason"] == "conflict"
    assert "full_name" in line["detail"] or how in {"link", "hash_upgrade"}
    assert NewUser.objects.get(pk=bob.pk).full_name == "Bob"  # nothing written
    out, _ = run("copy_users", "--skip-invalid")
    assert "rejected, conflict: 1" in out
    after = NewUser.objects.get(pk=alice.pk).__dict__
    assert {k: after[k] for k in ("full_name", "password")} == {
        k: before[k] for k in ("full_name", "password")
    }
    assert NewUser.objects.get(pk=bob.pk).full_name == "Bob Changed"


def test_signups_are_never_touched_and_their_id_or_username_is_rejected(run, synced):
    signup = NewUser.objects.create_user("carol", "carol@example.com", "pw")
    clash_id = make_legacy("dave", "dave@example.com", id=signup.pk)
    clash_name = make_legacy("carol", "carol.legacy@example.com", id=signup.pk + 100)
    with pytest.raises(CommandError, match="id_taken: 1, username_taken: 1"):
        run("check_user_migration")
    out, _ = run("copy_users", "--skip-invalid")
    assert NewUser.objects.get(pk=signup.pk).username == "carol"
    assert not NewUser.objects.filter(pk=clash_name.pk).exists()
    assert not SyncState.objects.filter(pk__in=[signup.pk, clash_id.pk]).exists()


def test_next_signup_id_is_above_every_legacy_id_even_rejected_ones(run):
    make_legacy("good", "good@example.com", id=10)
    make_legacy("bad", "not-an-email", id=500)
    run("copy_users", "--skip-invalid")
    assert NewUser.objects.create_user("signup", "signup@example.com", "pw").pk > 500


def test_next_signup_id_is_above_legacy_ids_when_every_row_was_rejected(run):
    make_legacy("bad", "not-an-email", id=700)
    run("copy_users", "--skip-invalid")
    assert NewUser.objects.create_user("signup", "signup@example.com", "pw").pk > 700


def test_a_fixed_row_is_copied_by_the_next_sync(run):
    bad = make_legacy("bad", "not-an-email")
    run("copy_users", "--skip-invalid")
    User.objects.filter(pk=bad.pk).update(email="fixed@example.com")
    run("copy_users")
    assert NewUser.objects.get(pk=bad.pk).email == "fixed@example.com"


def test_an_unchanged_resync_writes_nothing_and_logs_nothing(run, synced):
    OperationLog.objects.all().delete()
    times = list(NewUser.objects.order_by("pk").values_list("updated_at", flat=True))
    out, _ = run("copy_users")
    assert "Nothing to do" in out
    assert list(NewUser.objects.order_by("pk").values_list("updated_at", flat=True)) == times
    assert not OperationLog.objects.exists()


def test_a_shared_email_group_takes_one_line_per_row_whatever_its_size(run):
    for i in range(40):
        make_legacy(f"u{i}", "Shared@example.com" if i % 2 else "shared@example.com")
    with pytest.raises(CommandError) as info:
        run("copy_users")
    rows = report_of(str(info.value))
    assert len(rows) == 40
    details = {r["detail"] for r in rows.values()}
    assert details == {
        "40 legacy users share the email 'shared@example.com' (any case); all of them are listed"
    }


def test_a_database_error_ends_in_one_line_without_key_values(run, monkeypatch):
    # As if another process had written a duplicate after the checks ran.
    monkeypatch.setattr(usercopy.Sync, "find_collisions", lambda self: None)
    make_legacy("first", "secret.person@example.com")
    make_legacy("second", "SECRET.person@example.com")
    with pytest.raises(CommandError) as info:
        run("copy_users")
    message = str(info.value)
    assert "The database refused the sync" in message and "\n" not in message
    assert "account_newuser_email_ci_unique" in message  # the real error, not a later one
    assert "secret" not in message.lower()
    assert NewUser.objects.count() == 0
    log = OperationLog.objects.get(kind="copy")
    assert log.ok is False and "secret" not in log.message.lower()


@pytest.mark.django_db(transaction=True)
def test_a_failed_copy_inside_migration_0002_leaves_an_operation_log(run, settings):
    settings.USER_COPY_SKIP_INVALID = False
    run("migrate", "account", "0001")
    try:
        make_legacy("bad", "not-an-email")
        with pytest.raises(CommandError, match="cannot be synced"):
            run("migrate", "account", "0002")
        log = OperationLog.objects.get(kind="copy")
        assert log.ok is False and "email_invalid: 1" in log.message
        assert NewUser.objects.count() == 0
    finally:
        User.objects.all().delete()
        run("migrate", "account")


def test_the_admin_log_blocks_a_delete_like_any_other_reference(run, synced):
    alice, bob = synced
    LogEntry.objects.create(user_id=bob.pk, action_flag=1, object_repr="x")
    User.objects.filter(pk=bob.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use"):
        run("copy_users")


def test_a_table_unknown_to_django_blocks_a_delete(run, synced):
    _, bob = synced
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE shop_order (id integer PRIMARY KEY, "
            "buyer_id bigint REFERENCES account_newuser (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        cursor.execute("INSERT INTO shop_order VALUES (1, %s)", [bob.pk])
    User.objects.filter(pk=bob.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use") as info:
        run("copy_users")
    assert "shop_order" in report_of(str(info.value))[bob.pk]["detail"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["update", "update_fields", "add_link", "remove_link"])
def test_the_way_back_refuses_after_any_write_on_the_new_side(run, how):
    user = make_legacy("alice", "alice@example.com")
    group = Group.objects.create(name="editors")
    user.groups.add(group)
    run("copy_users")
    new = NewUser.objects.get(pk=user.pk)
    if how == "update":
        NewUser.objects.filter(pk=user.pk).update(full_name="Changed")
    elif how == "update_fields":
        new.last_login = datetime(2025, 1, 1, tzinfo=UTC)
        new.save(update_fields=["last_login"])
    elif how == "add_link":
        new.user_permissions.add(Permission.objects.get(codename="view_address"))
    else:
        new.groups.remove(group)
    try:
        with pytest.raises(
            CommandError, match="changed on the new side since the last sync"
        ) as info:
            run("migrate", "account", "0001")
        assert f"ids [{user.pk}]" in str(info.value)
        assert NewUser.objects.filter(pk=user.pk).exists()
    finally:
        run("migrate", "account")
        User.objects.all().delete()
        NewUser.objects.all().delete()
        SyncState.objects.all().delete()
        Group.objects.all().delete()


def test_rows_python_and_sql_disagree_on_never_make_valid_rows_fail(run):
    turkish = make_legacy("turkish", "user@İstanbul.com")
    kelvin = make_legacy("kelvin", "\u212aelvin@example.com")  # LOWER() may fold it to 'k'
    ascii_k = make_legacy("ascii_k", "kelvin@example.com")
    nbsp = make_legacy("nbsp", "nbsp@example.com", phone="\u00a0")
    out, _ = run("copy_users", "--skip-invalid")
    assert "rejected, email_non_ascii: 2" in out
    assert set(NewUser.objects.values_list("pk", flat=True)) == {ascii_k.pk, nbsp.pk}
    assert str(NewUser.objects.get(pk=nbsp.pk).phone_number) == ""
    assert not NewUser.objects.filter(pk__in=[turkish.pk, kelvin.pk]).exists()


def test_a_conflict_made_equal_by_hand_is_synced_again(run, synced):
    alice, _ = synced
    NewUser.objects.filter(pk=alice.pk).update(full_name="Same On Both")
    User.objects.filter(pk=alice.pk).update(full_name="Same On Both")
    run("copy_users")  # no conflict: both sides hold the same values
    User.objects.filter(pk=alice.pk).update(is_active=False)
    run("copy_users")  # and later legacy changes are carried again
    assert NewUser.objects.get(pk=alice.pk).is_active is False


def test_users_with_several_links_added_in_any_order_stay_in_sync(run):
    user = make_legacy("many", "many@example.com")
    groups = [Group.objects.create(name=f"g{i}") for i in range(4)]
    for group in reversed(groups):
        user.groups.add(group)
    perms = list(Permission.objects.order_by("-pk")[:3])
    user.user_permissions.add(*perms)
    run("copy_users")
    out, _ = run("copy_users")
    assert "Nothing to do" in out  # the joined and the per-row digests agree
    User.objects.filter(pk=user.pk).update(full_name="Changed")
    run("copy_users")  # not a conflict: the new side was not changed
    assert NewUser.objects.get(pk=user.pk).full_name == "Changed"


def test_digests_do_not_depend_on_the_session_time_zone(run, synced):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no session time zone")
    alice, _ = synced
    User.objects.filter(pk=alice.pk).update(last_login=datetime(2025, 1, 1, tzinfo=UTC))
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Asia/Kathmandu'")
    out, _ = run("copy_users")  # a legacy change, not a conflict
    assert "update 1" in out and "conflict" not in out
    with connection.cursor() as cursor:
        # The sync gives the session its own time zone back; Django reads only in UTC.
        cursor.execute("SHOW TimeZone")
        assert cursor.fetchone()[0] == "Asia/Kathmandu"
        cursor.execute("SET TIME ZONE 'UTC'")
    assert NewUser.objects.get(pk=alice.pk).last_login == datetime(2025, 1, 1, tzinfo=UTC)


def test_an_unusable_report_directory_ends_in_one_line(run, settings, tmp_path):
    (tmp_path / "file").write_text("")
    settings.REPORT_DIR = tmp_path / "file" / "reports"
    make_legacy("a", "a@example.com")
    with pytest.raises(CommandError, match="set REPORT_DIR to a directory"):
        run("copy_users")


def test_a_refused_first_copy_still_moves_the_sequence_past_legacy_ids(run):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite rolls its id counter back with the refused copy")
    make_legacy("good", "good@example.com", id=10)
    make_legacy("bad", "not-an-email", id=500)
    with pytest.raises(CommandError):
        run("copy_users")
    assert NewUser.objects.create_user("signup", "signup@example.com", "pw").pk > 500


@pytest.mark.django_db(transaction=True)
def test_after_a_restore_the_next_sync_carries_what_changed_since_the_backup(run, tmp_path):
    from django.core.management import call_command

    alice = make_legacy("alice", "alice@example.com", password=make_password("old-pass"))
    run("copy_users")
    call_command("backup_accounts", "--output", str(tmp_path / "b.jsonl.gz"), verbosity=0)
    User.objects.filter(pk=alice.pk).update(password=make_password("new-pass"))
    late = make_legacy("late", "late@example.com")
    run("copy_users")
    call_command("restore_accounts", str(tmp_path / "b.jsonl.gz"), "--replace", verbosity=0)
    # The restore brings back the new side and SyncState as they were at the backup.
    User.objects.filter(pk=alice.pk).update(password=make_password("newer-pass"))
    make_legacy("late2", "late2@example.com", id=late.pk + 1)
    User.objects.filter(pk=late.pk).delete()
    run("copy_users")
    assert authenticate(username="alice", password="newer-pass").pk == alice.pk
    assert NewUser.objects.filter(username="late2").exists()
    clean_up_after_a_transaction_test()


def test_migrate_refusing_the_copy_ends_in_one_line_without_a_class_name(fresh_database_url):
    from .conftest import assert_clean_failure, manage

    assert manage("migrate", "account", "0001", url=fresh_database_url).returncode == 0
    code = "from account.models import User; User.objects.create(username='x', email='bad')"
    assert manage("shell", "-c", code, url=fresh_database_url).returncode == 0
    proc = manage("migrate", url=fresh_database_url)
    assert_clean_failure(proc, "migrate: error: 1 legacy users cannot be synced")
    assert "CopyError" not in proc.stdout + proc.stderr


@pytest.mark.django_db(transaction=True)
def test_the_sync_reads_in_one_repeatable_read_snapshot(tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE instead")
    make_legacy("alice", "alice@example.com")
    seen = []

    def on_start(total):
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_isolation")
            seen.append(cursor.fetchone()[0])

    try:
        usercopy.copy_users(models_now(), report_dir=tmp_path, on_start=on_start)
        assert seen == ["repeatable read"]
    finally:
        clean_up_after_a_transaction_test()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("change", ["username = 'bad name!'", "password = 'hunter2'"])
def test_nested_a_legacy_change_between_the_check_and_the_write_is_not_written(
    tmp_path, monkeypatch, change
):
    """Nested in a caller's READ COMMITTED transaction, the sync reads at two moments. What
    Python checked (username, password) is what is written, and the verification catches the
    legacy row that changed in between: nothing unchecked reaches NewUser."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite lets no other writer in while the sync runs")
    from django.db import transaction

    make_legacy("alice", "alice@example.com")
    bob = make_legacy("bob", "bob@example.com")
    real = usercopy.Sync.write_rows

    def racing(self):
        with other_connection() as other:
            other.execute(f"UPDATE account_user SET {change} WHERE id = %s", [bob.pk])
        real(self)

    monkeypatch.setattr(usercopy.Sync, "write_rows", racing)
    try:
        failed = pytest.raises(CommandError, match="Verification failed.*fields differ")
        with failed, transaction.atomic():
            usercopy.copy_users(models_now(), report_dir=tmp_path)
        assert not NewUser.objects.exists()
    finally:
        clean_up_after_a_transaction_test()


@pytest.mark.django_db(transaction=True)
def test_nested_a_conflicting_user_deleted_meanwhile_is_left_to_the_next_sync(
    tmp_path, monkeypatch
):
    """A user changed on both sides and deleted from the legacy table while the sync runs
    (nested, READ COMMITTED): nothing is written for it, no traceback; the next sync sees the
    deletion and reports the conflict."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite lets no other writer in while the sync runs")
    from django.db import transaction

    alice = make_legacy("alice", "alice@example.com")
    try:
        usercopy.copy_users(models_now(), report_dir=tmp_path)
        User.objects.filter(pk=alice.pk).update(full_name="Legacy side")
        NewUser.objects.filter(pk=alice.pk).update(full_name="New side")
        real = usercopy.Sync.report_conflicts

        def deleting_first(self, ids):
            with other_connection() as other:
                other.execute("DELETE FROM account_user WHERE id = %s", [alice.pk])
            return real(self, ids)

        monkeypatch.setattr(usercopy.Sync, "report_conflicts", deleting_first)
        with transaction.atomic():
            result = usercopy.copy_users(models_now(), report_dir=tmp_path)
        assert (result.pending, result.written, result.rejected_total) == (1, 0, 0)
        assert NewUser.objects.get(pk=alice.pk).full_name == "New side"
        monkeypatch.undo()
        with pytest.raises(CommandError, match="conflict: 1"):
            usercopy.copy_users(models_now(), report_dir=tmp_path)
        assert NewUser.objects.get(pk=alice.pk).full_name == "New side"
    finally:
        clean_up_after_a_transaction_test()


def test_nested_the_sync_gives_back_the_settings_it_changed(tmp_path):
    """Inside a caller's transaction (the cut-over's), the sync's own PostgreSQL settings do
    not outlive it: the caller's later statements run under the caller's settings."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL settings")
    make_legacy("alice", "alice@example.com")
    names = ("TimeZone", "work_mem", "parallel_setup_cost", "parallel_tuple_cost", "jit")

    def current():
        with connection.cursor() as cursor:
            return [
                (cursor.execute("SELECT current_setting(%s)", [n]), cursor.fetchone()[0])[1]
                for n in names
            ]

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL TimeZone = 'Asia/Kathmandu'")
    before = current()
    usercopy.copy_users(models_now(), report_dir=tmp_path)
    assert NewUser.objects.count() == 1
    assert current() == before


def test_the_sync_never_drops_a_permanent_table_named_like_its_temporary_ones(run):
    with connection.cursor() as cursor:
        for name in ("sync_plan", "sync_values", "sync_digests"):
            cursor.execute(f"CREATE TABLE {name} (x integer)")
    make_legacy("alice", "alice@example.com")
    run("copy_users")
    assert NewUser.objects.count() == 1
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
    assert {"sync_plan", "sync_values", "sync_digests"} <= set(tables)


# Links are digested by natural key (a group's name; a permission's app label, model and
# codename), never by id: a restore gives groups and permissions other ids (migration 0004).


def digests_now(keys="natural") -> dict:
    """{user id: (legacy digest, new digest)} of both rows as they are now, by `keys`."""
    from uuid import UUID

    from django.db import transaction

    sync = usercopy.Sync(models_now(), "default", False, False, 0, None, None)
    _, legacy = sync.digest(User, "l", correlated=True, keys=keys)
    _, new = sync.digest(NewUser, "n", correlated=True, keys=keys)
    with transaction.atomic():
        sync.utc()
        rows = sync.sql(
            f"SELECT l.id, {legacy}, {new} FROM {sync.table(User)} l "
            f"JOIN {sync.table(NewUser)} n ON n.id = l.id"
        )
    return {pk: (UUID(str(a)), UUID(str(b))) for pk, a, b in rows}


def recorded() -> dict:
    return {s.user_id: (s.legacy_digest, s.new_digest) for s in SyncState.objects.all()}


def review_permission(model):
    """A permission of our own, codename `review` on `model`'s content type."""
    from django.contrib.contenttypes.models import ContentType

    ct = ContentType.objects.get_for_model(model)
    return Permission.objects.create(codename="review", name="Can review", content_type=ct)


def test_a_legacy_edit_after_groups_and_permissions_got_other_ids_is_an_update(run, synced):
    alice, _ = synced
    groups = [Group.objects.create(name=name) for name in ("authors", "editors")]
    perms = [review_permission(Address), Permission.objects.get(codename="view_address")]
    alice.groups.add(*groups)
    alice.user_permissions.add(*perms)
    run("copy_users")
    new = NewUser.objects.get(pk=alice.pk)
    assert {g.name for g in new.groups.all()} == {"authors", "editors"}
    # As a restore into another database leaves them: the same groups and permissions, by
    # name and natural key, with other ids, re-created in the other order (sorting by id
    # would now put them the other way round).
    old_ids = {g.pk for g in groups} | {p.pk for p in perms}
    for obj in [*groups, perms[0]]:
        obj.delete()  # its links on both sides with it
    groups = [Group.objects.create(name=name) for name in ("editors", "authors")]
    perms[0] = review_permission(Address)
    for user in (alice, new):
        user.groups.add(*groups)
        user.user_permissions.add(perms[0])
    assert not old_ids & ({g.pk for g in groups} | {perms[0].pk})
    assert digests_now()[alice.pk] == recorded()[alice.pk]  # neither side changed
    User.objects.filter(pk=alice.pk).update(full_name="Alice Edited")
    out, _ = run("copy_users")  # a legacy-only edit: an update, not a conflict
    assert "update 1" in out and "conflict" not in out
    out, _ = run("copy_users")
    assert "Nothing to do" in out
    new.refresh_from_db()
    assert new.full_name == "Alice Edited"
    assert {g.pk for g in new.groups.all()} == {g.pk for g in groups}
    assert {p.pk for p in new.user_permissions.all()} == {p.pk for p in perms}


@pytest.mark.parametrize("side", ["legacy", "new"])
@pytest.mark.parametrize("what", ["group", "permission"])
def test_a_link_to_another_group_or_permission_is_a_change_on_its_side(run, synced, side, what):
    """Another group (another name), or a permission with the same codename on another
    content type: a change of the side it was made on, whatever the ids."""
    from account.models import Activity

    alice, bob = synced
    if what == "group":
        before, after = Group.objects.create(name="editors"), Group.objects.create(name="authors")
        field = "groups"
    else:
        before, after = review_permission(Address), review_permission(Activity)
        field = "user_permissions"
    getattr(alice, field).add(before)
    run("copy_users")
    user = alice if side == "legacy" else NewUser.objects.get(pk=alice.pk)
    getattr(user, field).set([after])
    if side == "legacy":
        out, _ = run("copy_users")
        assert "update 1" in out
        assert list(getattr(NewUser.objects.get(pk=alice.pk), field).all()) == [after]
        return
    out, _ = run("copy_users")
    assert "Nothing to do" in out  # the new side's change is kept
    User.objects.filter(pk=alice.pk).update(full_name="Legacy Side")
    with pytest.raises(CommandError, match="conflict: 1") as info:
        run("copy_users")
    assert field in report_of(str(info.value))[alice.pk]["detail"]


def test_a_renamed_group_changes_both_sides_and_equal_members_are_synced_again(run, synced):
    """The price of natural keys: a rename changes the digests of the group's members on
    both sides. Members whose two sides hold the same values are synced again, no conflict."""
    alice, _ = synced
    editors = Group.objects.create(name="editors")
    alice.groups.add(editors)
    run("copy_users")
    Group.objects.filter(pk=editors.pk).update(name="chief editors")
    out, _ = run("copy_users")
    assert "update 1" in out and "conflict" not in out
    out, _ = run("copy_users")
    assert "Nothing to do" in out


def test_migration_0004_rewrites_the_digests_recorded_by_ids_only_where_they_matched(run):
    """A database synced before 0004 holds digests by ids: 0004 replaces each side's digest
    with the natural keys' one where the ids' one matched the row as it is, and leaves the
    sides changed since the last sync changed; its reverse does the opposite."""
    from importlib import import_module
    from types import SimpleNamespace

    from django.db.migrations.executor import MigrationExecutor

    migration = import_module("account.migrations.0004_natural_key_digests")
    apps = MigrationExecutor(connection).loader.project_state(("account", "0003_change_log")).apps
    editor = SimpleNamespace(connection=connection)
    names = ("alice", "bob", "carol", "dave", "erin")
    alice, bob, carol, dave, erin = (make_legacy(n, f"{n}@example.com") for n in names)
    editors = Group.objects.create(name="editors")
    perm = review_permission(Address)
    for user in (alice, bob, carol):
        user.groups.add(editors)
        user.user_permissions.add(perm)
    erin.user_permissions.add(perm)  # a permission, no group
    run("copy_users")
    by_ids = digests_now("ids")
    for pk, (legacy, new) in by_ids.items():  # as the sync recorded them before 0004
        SyncState.objects.filter(pk=pk).update(legacy_digest=legacy, new_digest=new)
    # Changed since that sync: bob's legacy row, carol's new row.
    User.objects.filter(pk=bob.pk).update(full_name="Bob Legacy Edit")
    NewUser.objects.filter(pk=carol.pk).update(full_name="Carol New Edit")
    before = recorded()
    assert before[alice.pk] != digests_now()[alice.pk]  # the old formula's, not the new one's

    migration.ids_to_natural_keys(apps, editor)
    natural, after = digests_now(), recorded()
    assert after[alice.pk] == natural[alice.pk] and after[erin.pk] == natural[erin.pk]
    assert after[dave.pk] == natural[dave.pk] == by_ids[dave.pk]  # no links: the same
    assert after[bob.pk] == (before[bob.pk][0], natural[bob.pk][1])  # legacy side: changed
    assert after[carol.pk] == (natural[carol.pk][0], before[carol.pk][1])  # new side: changed
    assert natural[bob.pk][0] != before[bob.pk][0] and natural[carol.pk][1] != before[carol.pk][1]

    migration.natural_keys_to_ids(apps, editor)
    assert recorded() == before
    migration.ids_to_natural_keys(apps, editor)
    assert recorded() == after

    # The next sync sees what changed since, as it would have before the upgrade.
    out, _ = run("copy_users")
    assert "update 1" in out and "conflict" not in out
    assert NewUser.objects.get(pk=bob.pk).full_name == "Bob Legacy Edit"
    assert NewUser.objects.get(pk=carol.pk).full_name == "Carol New Edit"
    out, _ = run("copy_users")
    assert "Nothing to do" in out
