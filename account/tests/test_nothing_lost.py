"""Nobody lost or silently changed around the cut-over: references in every schema, rejected
changes of live users, a rollback that reads the change log, and dry runs that refuse what
the real run would refuse. Each test names the case it reproduces."""

import threading
import time

import pytest
from django.core.management.base import CommandError
from django.db import connection

from account.models import NewUser, User

from . import test_cutover
from .conftest import assert_clean_failure, make_legacy
from .test_cutover import NEW, OLD, ON_POSTGRESQL, is_cut_over_in, postgresql_only
from .test_sync import report_of

# The cut-over tests' databases: a deploy-1 database per test (see test_cutover).
deploy1_template = test_cutover.deploy1_template
deploy = test_cutover.deploy


def sql(statement, params=()):
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


# --- the sync: a user deleted from the legacy table but used on the new side ------------------


@postgresql_only
@pytest.mark.django_db
@pytest.mark.parametrize("on_delete", ["CASCADE", "SET NULL", "NO ACTION", "RESTRICT"])
def test_a_reference_from_another_schema_keeps_a_deleted_legacy_user(run, on_delete):
    """crm.note is outside the search_path: Django's introspection does not see it."""
    alice = make_legacy("alice", "alice@example.com")
    make_legacy("bob", "bob@example.com", phone="9851234567")
    run("copy_users")
    sql("CREATE SCHEMA crm")
    sql(
        "CREATE TABLE crm.note (id serial PRIMARY KEY, "
        f"user_id bigint REFERENCES account_newuser (id) ON DELETE {on_delete})"
    )
    sql("INSERT INTO crm.note (user_id) VALUES (%s)", [alice.pk])
    User.objects.filter(pk=alice.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use: 1") as refused:
        run("copy_users")
    assert "crm.note" in report_of(str(refused.value))[alice.pk]["detail"]
    out, _ = run("copy_users", "--skip-invalid")  # the others go on; this one is kept
    assert "rejected, deleted_but_in_use: 1" in out
    assert sql("SELECT user_id FROM crm.note") == [(alice.pk,)]
    assert NewUser.objects.filter(pk=alice.pk).exists()


@postgresql_only
@pytest.mark.django_db
def test_a_reference_from_a_partitioned_table_keeps_a_deleted_legacy_user(run):
    alice = make_legacy("alice", "alice@example.com")
    run("copy_users")
    sql("CREATE SCHEMA crm")
    sql(
        "CREATE TABLE crm.event (id bigint, at date NOT NULL, user_id bigint "
        "REFERENCES account_newuser (id) ON DELETE CASCADE) PARTITION BY RANGE (at)"
    )
    sql("CREATE TABLE crm.event_2026 PARTITION OF crm.event FOR VALUES FROM (%s) TO (%s)",
        ["2026-01-01", "2027-01-01"])  # fmt: skip
    sql("INSERT INTO crm.event VALUES (1, '2026-05-01', %s)", [alice.pk])
    User.objects.filter(pk=alice.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use: 1") as refused:
        run("copy_users")
    assert "rows in crm.event point" in report_of(str(refused.value))[alice.pk]["detail"]
    assert sql("SELECT COUNT(*) FROM crm.event") == [(1,)]


@pytest.mark.django_db
def test_a_generic_reference_keeps_a_deleted_legacy_user(run):
    """A (content_type_id, object_id) pair naming the new user, in another schema on
    PostgreSQL: deleting the user would leave it pointing at nobody."""
    from django.contrib.contenttypes.models import ContentType

    alice = make_legacy("alice", "alice@example.com")
    run("copy_users")
    table = "crm.tagged" if ON_POSTGRESQL else "tagged"
    if ON_POSTGRESQL:
        sql("CREATE SCHEMA crm")
    sql(f"CREATE TABLE {table} (id integer PRIMARY KEY, content_type_id integer, object_id text)")
    ct = ContentType.objects.get_for_model(NewUser)
    sql(f"INSERT INTO {table} VALUES (1, %s, %s)", [ct.pk, str(alice.pk)])
    User.objects.filter(pk=alice.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use: 1") as refused:
        run("copy_users")
    detail = report_of(str(refused.value))[alice.pk]["detail"]
    assert f"{table}(content_type_id, object_id) (generic)" in detail
    assert NewUser.objects.filter(pk=alice.pk).exists()


# --- the restore: emptying a table would cascade into rows the backup does not hold ---------


@postgresql_only
@pytest.mark.django_db
@pytest.mark.parametrize("on_delete", ["CASCADE", "SET NULL"])
def test_restore_replace_refuses_a_reference_from_another_schema(run, settings, on_delete):
    from pathlib import Path

    alice = make_legacy("alice", "alice@example.com")
    run("copy_users")
    run("backup_accounts")
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    sql("CREATE SCHEMA crm")
    sql(
        "CREATE TABLE crm.note (id serial PRIMARY KEY, "
        f"user_id bigint REFERENCES account_newuser (id) ON DELETE {on_delete})"
    )
    sql("INSERT INTO crm.note (user_id) VALUES (%s)", [alice.pk])
    with pytest.raises(CommandError, match="Dry run: a restore would refuse: Table crm.note"):
        run("restore_accounts", str(path), "--replace", "--dry-run")
    with pytest.raises(CommandError, match="Table crm.note points at account_newuser"):
        run("restore_accounts", str(path), "--replace")
    assert sql("SELECT user_id FROM crm.note") == [(alice.pk,)]


# --- the cut-over: a rejected change of a user already live is never dropped -----------------


def test_cutover_refuses_rejected_changes_of_users_already_in_newuser(deploy):
    """A ban with a now-invalid email, and a password change with one: --skip-invalid left
    them behind, and the banned user stayed active, the old password kept working."""
    deploy.python(
        OLD,
        "from account.models import User\n"
        "alice = User.objects.get(username='alice')\n"
        "alice.set_password('new-pass'); alice.email = 'not-an-email'; alice.save()\n"
        "User.objects.filter(username='bob').update(is_active=False, email='no-at-sign')",
    )
    alice, bob = deploy.user_id("alice"), deploy.user_id("bob")
    for args in (("--skip-invalid", "--dry-run"), ("--skip-invalid",)):
        proc = deploy.manage(NEW, "cutover", *args)
        assert_clean_failure(
            proc, "2 users already in NewUser have legacy changes the sync cannot carry",
            f"ids {alice}, {bob}", "Nothing was changed.",
        )  # fmt: skip
        assert not is_cut_over_in(deploy)
    # Fixed by the operator, the same cut-over goes through and carries both changes.
    deploy.sql("UPDATE account_user SET email = 'alice@example.com' WHERE id = %s", [alice])
    deploy.sql("UPDATE account_user SET email = 'bob@example.com' WHERE id = %s", [bob])
    deploy.cutover("--skip-invalid")
    out = deploy.python(
        NEW,
        "from django.contrib.auth import authenticate\n"
        "from account.models import NewUser\n"
        "print(authenticate(username='alice', password='alice-pass') is None,"
        " authenticate(username='alice', password='new-pass') is not None,"
        " NewUser.objects.get(username='bob').is_active)",
    )
    assert out.split()[-3:] == ["True", "True", "False"]


def test_cutover_refuses_a_legacy_delete_of_a_user_the_new_side_still_uses(deploy):
    user7 = deploy.user_id("user7")
    deploy.sql(
        "INSERT INTO account_address (user_id, street_address, city, state, postal_code, country)"
        " VALUES (%s, 'Main St 1', 'Kathmandu', '', '', 'Nepal')",
        [user7],
    )
    if ON_POSTGRESQL:
        for table in ("shop_order", "shop_team_members"):
            deploy.sql(f"DELETE FROM {table} WHERE user_id = %s", [user7])
    deploy.sql("DELETE FROM account_user WHERE id = %s", [user7])
    proc = deploy.manage(NEW, "cutover", "--skip-invalid")
    assert_clean_failure(proc, "deleted_but_in_use: 1", f"ids {user7}")
    assert not is_cut_over_in(deploy)


def test_the_cutovers_record_counts_each_user_once(deploy):
    deploy.cutover()
    out = deploy.python(
        NEW,
        "from account.models import NewUser, OperationLog\n"
        "log = OperationLog.objects.filter(kind='cutover', ok=True).first()\n"
        "print(log.summary['counts']['new_users'], NewUser.objects.count())",
    )
    recorded, actual = out.split()[-2:]
    assert recorded == actual
    assert f"{actual} users in NewUser" in deploy.one(
        "SELECT message FROM account_operationlog WHERE kind = 'cutover'"
    )


# --- the rollback reads what the new side wrote --------------------------------------------------


@postgresql_only
def test_the_rollback_leaves_users_the_new_side_did_not_write(deploy):
    """An administrator fixes a legacy row behind the trigger after the cut-over: NewUser
    differs from it, but nobody wrote NewUser, so the rollback must not 'carry' its value."""
    deploy.cutover()
    deploy.sql(
        "SET session_replication_role = replica; "
        "UPDATE account_user SET full_name = 'Fixed By Admin' WHERE username = 'user3'"
    )
    deploy.python(
        NEW, "from account.models import NewUser; NewUser.objects.filter(username='user4')"
        ".update(full_name='Written On The New Side')"
    )  # fmt: skip
    deploy.rollback()
    names = dict(deploy.sql("SELECT username, full_name FROM account_user"))
    assert names["user3"] == "Fixed By Admin"
    assert names["user4"] == "Written On The New Side"
    # The ledger knows user3's two sides differ: the next sync carries the legacy value.
    deploy.ok(OLD, "copy_users")
    assert deploy.one("SELECT full_name FROM account_newuser WHERE username = 'user3'") == (
        "Fixed By Admin"
    )


def test_the_rollback_carries_a_write_made_to_newuser_before_the_cutover(deploy):
    """A NewUser row changed in deploy 1 (the sync keeps the new side) was live after the
    switch: the rollback carries it, though the change log began after it."""
    deploy.sql("UPDATE account_newuser SET full_name = 'Kept New Side' WHERE username = 'user2'")
    deploy.cutover()
    deploy.rollback()
    assert deploy.one("SELECT full_name FROM account_user WHERE username = 'user2'") == (
        "Kept New Side"
    )


def test_after_a_rollback_newuser_is_read_only_and_the_sync_still_writes_it(deploy):
    deploy.cutover()
    deploy.rollback()
    for code in (
        "NewUser.objects.filter(username='bob').delete()",
        "NewUser.objects.filter(username='bob').update(username='bobby')",
        "NewUser.objects.create_user('mallory', 'm@example.com', 'pw')",
    ):
        proc = deploy.manage(OLD, "shell", "-c", f"from account.models import NewUser; {code}")
        assert proc.returncode != 0, code
        assert "account_newuser is read-only: the cut-over was rolled back" in proc.stderr
    deploy.sql("UPDATE account_user SET full_name = 'Renamed' WHERE username = 'bob'")
    out = deploy.ok(OLD, "copy_users")
    assert "update 1" in out
    assert deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'") == "Renamed"
    deploy.cutover()  # and a second cut-over makes it writable again
    deploy.python(
        NEW, "from account.models import NewUser; NewUser.objects.create_user('eve', 'e@x.org')"
    )


@postgresql_only
def test_a_writer_running_through_the_rollback_loses_nothing(deploy):
    """New-side writes commit until the rollback's lock; after it they are refused (the app
    must be on the legacy model by then). Every acknowledged write is in the legacy table."""
    import psycopg

    deploy.cutover()
    ids = [pk for (pk,) in deploy.sql("SELECT id FROM account_newuser ORDER BY id")]
    acknowledged: dict[int, str] = {}
    refused = []
    stop = threading.Event()

    def write():
        conn = psycopg.connect(deploy.url, autocommit=True)
        n = 0
        while not stop.is_set():
            pk, n = ids[n % len(ids)], n + 1
            try:
                conn.execute(
                    "UPDATE account_newuser SET full_name = %s WHERE id = %s", [f"w{n}", pk]
                )
                acknowledged[pk] = f"w{n}"
            except psycopg.errors.ReadOnlySqlTransaction:
                refused.append(n)
                time.sleep(0.01)
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.5)
        deploy.rollback()
        time.sleep(0.3)
    finally:
        stop.set()
        writer.join()
    assert acknowledged and refused  # it wrote before the switch and was refused after it
    legacy = dict(deploy.sql("SELECT id, full_name FROM account_user"))
    assert {pk: legacy[pk] for pk in acknowledged} == acknowledged
    differ = deploy.one(
        "SELECT COUNT(*) FROM account_newuser n FULL JOIN account_user l ON l.id = n.id "
        "WHERE n.id IS NULL OR l.id IS NULL OR n.full_name <> l.full_name "
        "OR n.password <> l.password OR n.username <> l.username"
    )
    assert differ == 0
    assert "Nothing to do: NewUser mirrors the 23 legacy users." in deploy.ok(OLD, "copy_users")


def test_a_cutover_made_without_a_change_log_is_rolled_back_by_comparing_every_user(deploy):
    """A database cut over by an earlier version has no change log: nothing may be missed."""
    deploy.cutover()
    deploy.python(NEW, "from account import readonly; from account.models import NewUser; "
                  "readonly.stop_change_log(NewUser)")  # fmt: skip
    deploy.sql("UPDATE account_newuser SET full_name = 'Unlogged' WHERE username = 'bob'")
    assert "every user is compared" in deploy.rollback()
    assert deploy.one("SELECT full_name FROM account_user WHERE username = 'bob'") == "Unlogged"


def test_the_change_log_holds_one_row_per_user_written(deploy):
    """It grows with the users written since the cut-over, not with the writes."""
    deploy.cutover()
    deploy.python(
        NEW,
        "from django.contrib.auth.models import Group\n"
        "from account.models import NewUser\n"
        "alice = NewUser.objects.get(username='alice')\n"
        "for i in range(5):\n"
        "    alice.full_name = f'Alice {i}'; alice.save()\n"
        "NewUser.objects.get(username='bob').groups.add(Group.objects.get(name='editors'))\n"
        "NewUser.objects.create_user('dave', 'dave@example.com', 'pw')",
    )
    new_side = "FROM account_changelog WHERE side = 'new'"
    assert sorted(r[0] for r in deploy.sql(f"SELECT op {new_side}")) == [
        "insert", "links", "update",
    ]  # fmt: skip
    deploy.rollback()
    # The legacy side's log (PostgreSQL) holds what the rollback wrote back, for the next sync.
    assert deploy.one(f"SELECT COUNT(*) {new_side}") == 0


def test_the_documented_recovery_from_the_cutovers_backup_works(deploy):
    """NewUser lost after the cut-over: the rollback refuses and names the cut-over's backup;
    restoring it with the setting it was taken with, then rolling back, brings everyone back."""
    users = "SELECT id, username, password, email, is_active FROM account_user ORDER BY id"
    before = deploy.sql(users)
    deploy.cutover()
    (backup,) = (deploy.tmp_path / "backups").glob("accounts-*")
    if ON_POSTGRESQL:  # as only an administrator can: the change log refuses TRUNCATE
        deploy.sql("SET session_replication_role = replica; TRUNCATE account_newuser CASCADE")
    else:
        deploy.sql("DELETE FROM account_newuser")
    proc = deploy.manage(OLD, "cutover_rollback")
    assert_clean_failure(proc, "account_newuser is empty", f"make restore FILE={backup} ")
    deploy.ok(NEW, "restore_accounts", str(backup), "--replace")
    assert "Rolled back to account.User" in deploy.rollback()
    assert not is_cut_over_in(deploy)
    assert deploy.sql(users) == before
    assert deploy.one("SELECT COUNT(*) FROM account_newuser") == len(before)
    out = deploy.python(
        OLD,
        "from django.contrib.auth import authenticate\n"
        "print(authenticate(username='alice', password='alice-pass') is not None)",
    )
    assert out.split()[-1] == "True"


# --- what the check lists, and dry runs that refuse what the real run would -------------------


def test_the_cutover_check_names_views_over_the_legacy_table(deploy):
    schema = "crm." if ON_POSTGRESQL else ""
    if ON_POSTGRESQL:
        deploy.sql("CREATE SCHEMA crm")
    deploy.sql(f"CREATE VIEW {schema}active AS SELECT id, username FROM account_user")
    deploy.sql(f"CREATE VIEW {schema}active_staff AS SELECT id FROM {schema}active")
    out = deploy.cutover("--dry-run")
    for view in ("active", "active_staff"):
        assert f"note: the view {schema}{view} reads account_user, which is frozen" in out


@postgresql_only
def test_the_cutover_check_names_generic_references_in_another_schema(deploy):
    ct = deploy.one(
        "SELECT id FROM django_content_type WHERE app_label = 'account' AND model = 'user'"
    )
    deploy.sql("CREATE SCHEMA crm")
    deploy.sql("CREATE TABLE crm.tag (id serial PRIMARY KEY, content_type_id int, object_id text)")
    deploy.sql("INSERT INTO crm.tag (content_type_id, object_id) VALUES (%s, '2')", [ct])
    out = deploy.cutover("--dry-run")
    assert "note: 1 rows of crm.tag(content_type_id, object_id) point at legacy users" in out


@postgresql_only
def test_a_partitioned_table_moves_with_the_cutover_and_back(deploy):
    deploy.sql(
        "CREATE TABLE shop_visit (id bigint, at date NOT NULL, user_id bigint NOT NULL "
        "REFERENCES account_user (id) ON DELETE CASCADE) PARTITION BY RANGE (at)"
    )
    deploy.sql("CREATE TABLE shop_visit_2026 PARTITION OF shop_visit FOR VALUES FROM "
               "('2026-01-01') TO ('2027-01-01')")  # fmt: skip
    deploy.sql("INSERT INTO shop_visit SELECT id, '2026-03-01', id FROM account_user")
    assert "shop_visit is partitioned" in deploy.cutover("--dry-run")
    deploy.cutover()
    assert [(r[0], r[2]) for r in deploy.references("shop_visit")] == [("account_newuser", True)]
    deploy.rollback()
    assert [r[0] for r in deploy.references("shop_visit")] == ["account_user"]


def test_a_database_without_the_admin_log_cuts_over(deploy):
    deploy.sql("DROP TABLE django_admin_log")
    assert "Dry run: nothing was changed." in deploy.cutover("--dry-run")
    assert "Cut over to account.NewUser" in deploy.cutover()
    assert "Rolled back to account.User" in deploy.rollback()


@postgresql_only
def test_the_dry_run_refuses_a_lock_the_real_run_would_not_get(deploy):
    import psycopg

    holder = psycopg.connect(deploy.url)
    try:
        holder.execute("LOCK TABLE shop_order IN ROW EXCLUSIVE MODE")  # an open writer
        proc = deploy.manage(NEW, "cutover", "--dry-run", "--lock-timeout", "0.5")
        assert_clean_failure(proc, "Could not lock the tables within 0.5 s")
    finally:
        holder.close()
    assert not is_cut_over_in(deploy)


# --- the review's cases: each class, more than its first example -----------------------------


def test_a_copied_user_deleted_from_newuser_stops_the_cutover(deploy):
    """A user the copy made, gone from NewUser: not "never copied", so never left behind."""
    pk = deploy.one("SELECT id FROM account_user WHERE username = 'user7'")
    deploy.sql("DELETE FROM account_profile WHERE user_id = %s", [pk])
    deploy.sql("DELETE FROM account_newuser WHERE id = %s", [pk])
    for args in (["--dry-run"], [], ["--skip-invalid"]):
        proc = deploy.manage(NEW, "cutover", *args)
        assert_clean_failure(
            proc, f"users the copy made are gone from NewUser (deleted there since; ids {pk})"
        )
    assert not is_cut_over_in(deploy)


def test_a_user_renamed_on_the_new_side_is_not_left_behind(deploy):
    """Same id, a SyncState row: the same person, whatever the username now."""
    pk = deploy.one("SELECT id FROM account_user WHERE username = 'user8'")
    deploy.sql("UPDATE account_newuser SET username = 'user8-renamed' WHERE id = %s", [pk])
    deploy.sql(  # a row pointing at them, which the reference check must not count
        "INSERT INTO django_admin_log (action_time, user_id, object_repr, action_flag, "
        "change_message) VALUES ('2026-01-01', %s, 'x', 1, '')",
        [pk],
    )
    out = deploy.cutover()
    assert "(0 legacy users left behind)" in deploy.one(
        "SELECT message FROM account_operationlog WHERE kind = 'cutover' AND ok"
    ), out
    assert "Rolled back to account.User" in deploy.rollback()
    assert deploy.one("SELECT username FROM account_user WHERE id = %s", [pk]) == "user8-renamed"


def test_the_dry_run_refuses_a_rejected_row_as_the_real_run_does(deploy):
    deploy.python(OLD, "from account.models import User\n"
                  "User.objects.create_user('mallory', 'not-an-email', 'pw')")  # fmt: skip
    for args in (["--dry-run"], []):
        proc = deploy.manage(NEW, "cutover", *args)
        assert_clean_failure(proc, "email_invalid: 1")
    assert not is_cut_over_in(deploy)


@postgresql_only
def test_a_partitioned_table_pointing_at_a_user_not_copied_yet_passes_the_dry_run(deploy):
    """The rehearsal runs the final sync, which copies that user, before the swap."""
    deploy.python(OLD, "from account.models import User\n"
                  "User.objects.create_user('newbie', 'newbie@example.com', 'pw')")  # fmt: skip
    pk = deploy.one("SELECT id FROM account_user WHERE username = 'newbie'")
    deploy.sql(
        "CREATE TABLE parts (id bigint, at date NOT NULL, user_id bigint NOT NULL "
        "REFERENCES account_user (id)) PARTITION BY RANGE (at)"
    )
    deploy.sql("CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM "
               "('2026-01-01') TO ('2027-01-01')")  # fmt: skip
    deploy.sql("INSERT INTO parts VALUES (1, '2026-03-01', %s)", [pk])
    assert "Dry run: nothing was changed." in deploy.cutover("--dry-run")
    assert not deploy.sql("SELECT 1 FROM account_newuser WHERE id = %s", [pk])  # rolled back
    assert "Cut over to account.NewUser" in deploy.cutover()


@postgresql_only
@pytest.mark.django_db
@pytest.mark.parametrize("how", ["foreign key", "generic"])
def test_a_reference_to_the_profile_keeps_a_deleted_legacy_user(run, how):
    """The profile is deleted with the user: what points at it is lost with it."""
    from account.catalog import content_type_id
    from account.models import Profile

    alice = make_legacy("alice", "alice@example.com")
    run("copy_users")
    profile = Profile.objects.get(user_id=alice.pk)
    sql('CREATE SCHEMA "Other"')
    if how == "foreign key":
        sql('CREATE TABLE "Other".pnotes (id serial PRIMARY KEY, '
            "profile_id bigint REFERENCES account_profile (id) ON DELETE CASCADE)")  # fmt: skip
        sql('INSERT INTO "Other".pnotes (profile_id) VALUES (%s)', [profile.pk])
    else:
        sql('CREATE TABLE "Other".pnotes (id serial PRIMARY KEY, content_type_id int, '
            "object_id text)")  # fmt: skip
        sql('INSERT INTO "Other".pnotes (content_type_id, object_id) VALUES (%s, %s)',
            [content_type_id(Profile), str(profile.pk)])  # fmt: skip
    User.objects.filter(pk=alice.pk).delete()
    with pytest.raises(CommandError, match="deleted_but_in_use: 1") as refused:
        run("copy_users")
    assert "pnotes" in report_of(str(refused.value))[alice.pk]["detail"]
    assert sql('SELECT count(*) FROM "Other".pnotes') == [(1,)]
    assert NewUser.objects.filter(pk=alice.pk).exists()


@postgresql_only
def test_views_over_the_legacy_link_tables_are_named(deploy):
    deploy.sql('CREATE SCHEMA "Reports"')
    deploy.sql('CREATE VIEW "Reports"."UserGroups" AS SELECT * FROM account_user_groups')
    deploy.sql('CREATE VIEW "Reports".perms AS SELECT * FROM account_user_user_permissions')
    out = deploy.cutover("--dry-run")
    assert '"Reports"."UserGroups" reads account_user_groups' in out
    assert '"Reports".perms reads account_user_user_permissions' in out


def test_a_live_user_without_a_ledger_row_keeps_the_rejected_change_rule(deploy):
    """No SyncState row (lost): the new user with the same id and username is that person, so
    their rejected ban is a live user's, refused with --skip-invalid too."""
    pk = deploy.one("SELECT id FROM account_user WHERE username = 'user9'")
    deploy.sql("DELETE FROM account_syncstate WHERE user_id = %s", [pk])
    deploy.sql("UPDATE account_user SET is_active = %s, email = 'banned' WHERE id = %s",
               [False if ON_POSTGRESQL else 0, pk])  # fmt: skip
    proc = deploy.manage(NEW, "cutover", "--skip-invalid")
    assert_clean_failure(proc, "users already in NewUser have legacy changes")
    assert f"ids {pk}" in proc.stderr
    assert not is_cut_over_in(deploy)


# --- the change logs cannot be switched off unseen ------------------------------------------------


@postgresql_only
def test_a_newuser_write_made_while_its_log_trigger_was_off_is_carried_back(deploy):
    """Disabled, written, enabled again: the DDL watch logged a 'full' row on the new side,
    so the rollback compares every user instead of trusting the log."""
    deploy.cutover()
    deploy.sql(
        "ALTER TABLE account_newuser DISABLE TRIGGER account_newuser_change_log; "
        "UPDATE account_newuser SET full_name = 'Behind The Log' WHERE username = 'bob'; "
        "ALTER TABLE account_newuser ENABLE ALWAYS TRIGGER account_newuser_change_log"
    )
    assert "the change log's triggers were changed" in deploy.rollback()
    assert deploy.one("SELECT full_name FROM account_user WHERE username = 'bob'") == (
        "Behind The Log"
    )


@postgresql_only
def test_a_replica_session_writing_newuser_is_logged_for_the_rollback(deploy):
    deploy.cutover()
    deploy.sql(
        "SET session_replication_role = replica; "
        "UPDATE account_newuser SET full_name = 'Replica Write' WHERE username = 'bob'"
    )
    out = deploy.rollback()
    assert "the users NewUser's writes touched since the cut-over" in out
    assert deploy.one("SELECT full_name FROM account_user WHERE username = 'bob'") == (
        "Replica Write"
    )


@postgresql_only
def test_the_legacy_log_is_off_while_cut_over_and_back_after_the_rollback(deploy):
    """After the cut-over nothing reads the legacy log: restores must not fill it (two rows
    per user each), and the rollback turns the capture on again."""
    deploy.cutover()
    legacy = "FROM account_changelog WHERE side = 'legacy'"
    assert deploy.one(f"SELECT COUNT(*) {legacy}") == 0
    (backup,) = (deploy.tmp_path / "backups").glob("accounts-*")
    deploy.sql("DELETE FROM shop_order; DELETE FROM shop_team_members")  # not in the backup
    for _ in range(2):
        deploy.ok(NEW, "restore_accounts", str(backup), "--replace")
    assert deploy.one(f"SELECT COUNT(*) {legacy} AND op <> 'full'") == 0
    deploy.rollback()
    assert not deploy.sql(
        "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'account_user%%capture%%' "
        "AND tgenabled <> 'A'"
    )
    deploy.sql("UPDATE account_user SET full_name = 'Logged Again' WHERE username = 'bob'")
    bob = deploy.one("SELECT id FROM account_user WHERE username = 'bob'")
    assert (bob, "update") in deploy.sql(f"SELECT user_id, op {legacy}")
    deploy.ok(OLD, "copy_users")
    assert deploy.one("SELECT full_name FROM account_newuser WHERE username = 'bob'") == (
        "Logged Again"
    )


@postgresql_only
def test_a_replica_only_log_trigger_on_a_newuser_link_table_makes_the_rollback_compare_all(deploy):
    """Such a trigger skips ordinary sessions: the log is not trusted, every user compared,
    even with the DDL watch's 'full' row deleted (so the trigger's state alone decides)."""
    deploy.cutover()
    deploy.sql(
        "ALTER TABLE account_newuser_groups ENABLE REPLICA TRIGGER "
        "account_newuser_groups_change_log; "
        "DELETE FROM account_changelog WHERE side = 'new' AND op = 'full'"
    )
    assert "every user is compared" in deploy.rollback()


@postgresql_only
def test_a_log_gap_opened_during_the_rollbacks_backup_is_seen_under_its_lock(deploy):
    """The choice between the log and a full compare is made again under the lock."""
    deploy.cutover()
    gap = (
        "ALTER TABLE account_newuser DISABLE TRIGGER account_newuser_change_log; "
        "UPDATE account_newuser SET full_name = 'Gap During Backup' WHERE username = 'bob'; "
        "ALTER TABLE account_newuser ENABLE ALWAYS TRIGGER account_newuser_change_log"
    )
    out = deploy.python(
        OLD,
        "from django.core.management import call_command\n"
        "from django.db import connection\n"
        "from account import cutover\n"
        "backup = cutover.Rollback.take_backup\n"
        "def take_backup(self):\n"
        "    backup(self)\n"
        "    with connection.cursor() as cursor:\n"
        f"        cursor.execute({gap!r})\n"
        "cutover.Rollback.take_backup = take_backup\n"
        "call_command('cutover_rollback')",
    )
    assert "under the lock: every user is compared" in out
    assert deploy.one("SELECT full_name FROM account_user WHERE username = 'bob'") == (
        "Gap During Backup"
    )
