"""The change log drives the sync (PostgreSQL): it reaches what the full compare reaches.

Writers on other connections, in concurrent transactions, make a random mix of writes; after
each round the log-driven sync and the full compare (in a transaction rolled back) start from
the same state, and must leave the same NewUser, row for row, with the same outcomes.
"""

import random

import psycopg
import pytest
from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.db import connection, transaction

from account import changecapture, usercopy
from account.models import ChangeLog, NewUser, OperationLog, Profile, SyncState, User

from .conftest import make_legacy

MODELS = usercopy.CopyModels(
    legacy=User, new=NewUser, profile=Profile, state=SyncState, log=OperationLog, changes=ChangeLog
)
postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the change log needs PostgreSQL triggers"
)


def sync(**kwargs):
    return usercopy.copy_users(MODELS, skip_invalid=True, report_dir=settings.REPORT_DIR, **kwargs)


def writer(autocommit=False):
    s = connection.settings_dict
    return psycopg.connect(
        dbname=s["NAME"], user=s["USER"], host=s["HOST"], port=s["PORT"] or 5432,
        password=s["PASSWORD"], autocommit=autocommit,
    )  # fmt: skip


def snapshot():
    """NewUser as the sync left it, without the times each run stamps: rows, links,
    profiles, and the legacy side of the sync ledger."""
    fields = [f for f in usercopy.FIELDS]
    return {
        "users": sorted(NewUser.objects.values_list(*fields)),
        "groups": sorted(NewUser.groups.through.objects.values_list("newuser_id", "group_id")),
        "perms": sorted(
            NewUser.user_permissions.through.objects.values_list("newuser_id", "permission_id")
        ),
        "profiles": sorted(Profile.objects.values_list("user_id", flat=True)),
        "state": sorted(SyncState.objects.values_list("user_id", "legacy_digest")),
    }


def outcome(result):
    return (result.copied, result.updated, result.deleted, dict(result.rejected))


def legacy_log():
    return list(ChangeLog.objects.filter(side=ChangeLog.Side.LEGACY).values_list("user_id", "op"))


def random_write(rng, cur, ids, round_no, groups, perm_ids, password):
    """One random write to the legacy tables, on a user of `ids` (the writer's own share)."""
    pk = rng.choice(ids)
    kind = rng.choice(
        ["edit", "rename", "case", "delete", "group", "ungroup", "perm", "insert", "bad", "dup"]
    )
    if kind == "edit":
        cur.execute(
            "UPDATE account_user SET full_name = %s, is_active = NOT is_active WHERE id = %s",
            [f"Name {round_no} {pk}", pk],
        )
    elif kind == "rename":
        cur.execute(
            "UPDATE account_user SET username = %s WHERE id = %s", [f"r{round_no}_{pk}", pk]
        )
    elif kind == "case":
        cur.execute("UPDATE account_user SET email = upper(email) WHERE id = %s", [pk])
    elif kind == "delete":
        cur.execute("DELETE FROM account_user_groups WHERE user_id = %s", [pk])
        cur.execute("DELETE FROM account_user_user_permissions WHERE user_id = %s", [pk])
        cur.execute("DELETE FROM account_user WHERE id = %s", [pk])
        ids.remove(pk)
    elif kind == "group":
        cur.execute(
            "INSERT INTO account_user_groups (user_id, group_id) SELECT %s, %s "
            "WHERE EXISTS (SELECT 1 FROM account_user WHERE id = %s) ON CONFLICT DO NOTHING",
            [pk, rng.choice(groups), pk],
        )
    elif kind == "ungroup":
        cur.execute("DELETE FROM account_user_groups WHERE user_id = %s", [pk])
    elif kind == "perm":
        cur.execute(
            "INSERT INTO account_user_user_permissions (user_id, permission_id) SELECT %s, %s "
            "WHERE EXISTS (SELECT 1 FROM account_user WHERE id = %s) ON CONFLICT DO NOTHING",
            [pk, rng.choice(perm_ids), pk],
        )
    elif kind == "insert":
        name = f"n{round_no}_{rng.randrange(10**9)}"
        cur.execute(
            "INSERT INTO account_user (password, is_superuser, username, email, full_name, "
            "phone_number, is_active, is_staff) VALUES (%s, false, %s, %s, %s, '9841234567', "
            "true, false) RETURNING id",
            [password, name, f"{name}@example.com", name.title()],
        )
        ids.append(cur.fetchone()[0])
    elif kind == "bad":  # rejected by the sync (username_invalid): kept in view by the log
        cur.execute("UPDATE account_user SET username = %s WHERE id = %s", [f"bad {pk}", pk])
    else:  # an email another user holds: rejected (email_taken) until one of them changes
        cur.execute(
            "UPDATE account_user SET email = (SELECT email FROM account_user WHERE id = %s) "
            "WHERE id = %s AND EXISTS (SELECT 1 FROM account_user WHERE id = %s)",
            [rng.choice(ids), pk, pk],
        )


@postgresql
@pytest.mark.django_db(transaction=True)
def test_log_driven_sync_reaches_what_the_full_compare_reaches():
    rng = random.Random(20)
    groups = [Group.objects.create(name=f"g{i}").pk for i in range(3)]
    perm_ids = list(Permission.objects.values_list("pk", flat=True)[:5])
    for i in range(60):
        make_legacy(f"user{i}", f"user{i}@example.com")
    password = User.objects.first().password
    first = sync()
    assert first.source == "full" and first.copied == 60  # the log asks for it first
    ids = sorted(User.objects.values_list("pk", flat=True))
    shares = {0: [pk for pk in ids if pk % 3 == 0], 1: [pk for pk in ids if pk % 3 == 1]}
    late = [pk for pk in ids if pk % 3 == 2]  # the in-flight writer's own users
    a, b, w = writer(), writer(), writer()
    try:
        for round_no in range(8):
            # An in-flight writer takes a log id first and commits only after the sync ran:
            # the next sync carries it. (That a sync never deletes a row it did not read is
            # `test_a_write_committed_while_the_sync_runs_stays_in_the_log`'s: here the
            # sync's snapshot cannot see the row at all.)
            with w.cursor() as cur:
                pk = rng.choice(late)
                cur.execute(
                    "UPDATE account_user SET full_name = %s WHERE id = %s",
                    [f"Late {round_no}", pk],
                )
            for _ in range(12):
                share = rng.choice([0, 1])
                with (a if share == 0 else b).cursor() as cur:
                    random_write(rng, cur, shares[share], round_no, groups, perm_ids, password)
            for conn in rng.sample([a, b], 2):
                conn.commit()
            # New-side edits: kept (legacy untouched) or conflicts (both sides changed).
            for pk in rng.sample(ids, 3):
                NewUser.objects.filter(pk=pk).update(full_name=f"New side {round_no}")
            in_flight = sync()
            assert in_flight.source == "log"
            w.commit()
            with transaction.atomic():
                full = sync(full=True)
                expected = snapshot()
                transaction.set_rollback(True)
            assert full.source == "full"
            result = sync()
            assert result.source == "log", result.source_reason
            assert snapshot() == expected, f"round {round_no}"
            assert outcome(result) == outcome(full), f"round {round_no}"
            # The log holds only what is still pending: the users rejected or in conflict.
            assert {op for _, op in legacy_log()} <= {"pending"}
            assert len(legacy_log()) == result.rejected_total
    finally:
        for conn in (a, b, w):
            conn.close()


@postgresql
@pytest.mark.django_db(transaction=True)
def test_a_write_committed_while_the_sync_runs_stays_in_the_log(monkeypatch):
    """Nested in a caller's READ COMMITTED transaction, each statement sees what committed
    before it: a writer that took a log id below the ones the sync read and commits between
    the sync's read of the log and its delete must keep its row (the sync deletes the ids it
    read, not "every id up to the highest")."""
    alice = make_legacy("alice", "alice@example.com")
    bob = make_legacy("bob", "bob@example.com")
    sync()
    late = writer()
    with late.cursor() as cur:  # takes its log id first, commits during the sync
        cur.execute("UPDATE account_user SET full_name = 'Late' WHERE id = %s", [alice.pk])
    User.objects.filter(pk=bob.pk).update(full_name="Early")
    plan = usercopy.Sync.plan

    def plan_after_the_late_commit(self):
        late.commit()
        return plan(self)

    monkeypatch.setattr(usercopy.Sync, "plan", plan_after_the_late_commit)
    try:
        with transaction.atomic():
            assert sync().source == "log"
    finally:
        late.close()
    monkeypatch.undo()
    assert legacy_log() == [(alice.pk, "update")]
    result = sync()
    assert (result.source, result.updated) == ("log", 1)
    assert NewUser.objects.get(pk=alice.pk).full_name == "Late"


@postgresql
@pytest.mark.django_db(transaction=True)
def test_the_log_stays_bounded_under_a_steady_write_load():
    for i in range(20):
        make_legacy(f"user{i}", f"user{i}@example.com")
    sync()
    ids = list(User.objects.values_list("pk", flat=True))
    sizes = []
    with writer(autocommit=True) as conn, conn.cursor() as cur:
        for round_no in range(15):
            for n in range(40):  # every user written twice a round
                cur.execute(
                    "UPDATE account_user SET full_name = %s WHERE id = %s",
                    [f"R{round_no} {n}", ids[n % len(ids)]],
                )
            assert len(legacy_log()) == 40  # one row per write: the writer never reads the log
            result = sync()
            assert result.source == "log" and result.updated == len(ids)
            sizes.append(len(legacy_log()))
    assert sizes == [0] * 15  # applied rows are deleted: the log does not grow with the writes


@postgresql
@pytest.mark.django_db(transaction=True)
def test_truncate_and_renames_make_the_next_sync_compare_every_user():
    group = Group.objects.create(name="staff")
    alice = make_legacy("alice", "alice@example.com")
    alice.groups.add(group)
    make_legacy("bob", "bob@example.com")
    sync()
    assert sync().source == "log"
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE account_user_groups")
    result = sync()
    assert result.source == "full" and "asks for it" in result.source_reason
    assert not NewUser.objects.get(pk=alice.pk).groups.exists()
    assert sync().source == "log"
    group.name = "admins"
    group.save()
    assert sync().source == "full"
    # SyncState written outside the sync (a rollback's ledger, say): every user again.
    usercopy.mark_in_sync(MODELS)
    assert sync().source == "full"
    assert sync().source == "log"


def alter(statement):
    with connection.cursor() as cursor:
        cursor.execute(statement)


@postgresql
@pytest.mark.django_db(transaction=True)
def test_a_write_made_while_a_trigger_was_off_is_carried():
    """Disabled, written, enabled again before the next sync: the DDL watch logged a 'full'
    row, so the next sync compares every user and carries the write."""
    alice = make_legacy("alice", "alice@example.com")
    sync()
    assert sync().source == "log"
    alter("ALTER TABLE account_user DISABLE TRIGGER account_user_capture_update")
    try:
        result = sync()  # while it is off: every user, and the log's gap is remembered
        assert result.source == "full" and "account_user_capture_update" in result.source_reason
        User.objects.filter(pk=alice.pk).update(is_active=False, password="md5$salt$new")
    finally:
        alter("ALTER TABLE account_user ENABLE ALWAYS TRIGGER account_user_capture_update")
    assert changecapture.missing(connection) == []
    result = sync()
    assert result.source == "full" and "asks for it" in result.source_reason
    assert NewUser.objects.filter(pk=alice.pk, is_active=False, password="md5$salt$new").exists()
    assert sync().source == "log"


@postgresql
@pytest.mark.django_db(transaction=True)
def test_a_trigger_switched_off_and_on_inside_one_transaction_is_seen():
    alice = make_legacy("alice", "alice@example.com")
    sync()
    with transaction.atomic():
        alter("ALTER TABLE account_user DISABLE TRIGGER account_user_capture_update")
        User.objects.filter(pk=alice.pk).update(full_name="Behind The Log")
        alter("ALTER TABLE account_user ENABLE ALWAYS TRIGGER account_user_capture_update")
    assert changecapture.missing(connection) == []
    result = sync()
    assert result.source == "full"
    assert NewUser.objects.get(pk=alice.pk).full_name == "Behind The Log"


@postgresql
@pytest.mark.django_db(transaction=True)
def test_a_dropped_and_recreated_trigger_or_a_replaced_function_is_seen():
    make_legacy("alice", "alice@example.com")
    sync()
    (definition,) = [d for n, _, d in changecapture.triggers() if n == "account_user_capture"]
    for statement in (
        "DROP TRIGGER account_user_capture ON account_user; "
        f"CREATE TRIGGER account_user_capture {definition}; "
        "ALTER TABLE account_user ENABLE ALWAYS TRIGGER account_user_capture",
        f"CREATE OR REPLACE FUNCTION {changecapture.F_USER}() RETURNS trigger "
        f"LANGUAGE plpgsql AS $$ {changecapture.FUNCTIONS[changecapture.F_USER]} $$",
        # The rename and SyncState triggers are watched too, not only the user tables'.
        "ALTER TABLE auth_group DISABLE TRIGGER auth_group_capture_rename; "
        "ALTER TABLE auth_group ENABLE ALWAYS TRIGGER auth_group_capture_rename",
    ):
        assert sync().source == "log"
        alter(statement)
        assert sync().source == "full", statement
    assert sync().source == "log"


@postgresql
@pytest.mark.django_db(transaction=True)
def test_replica_sessions_are_logged_and_replica_only_triggers_count_as_missing():
    """`session_replication_role = replica` skips ordinary triggers: the capture fires
    ALWAYS, and a trigger set to fire only in replica sessions is as good as missing."""
    alice = make_legacy("alice", "alice@example.com")
    sync()
    with transaction.atomic():
        alter("SET LOCAL session_replication_role = replica")
        User.objects.filter(pk=alice.pk).update(full_name="Replica Write")
    assert legacy_log() == [(alice.pk, "update")]
    result = sync()
    assert result.source == "log" and result.updated == 1
    assert NewUser.objects.get(pk=alice.pk).full_name == "Replica Write"
    alter("ALTER TABLE account_user ENABLE REPLICA TRIGGER account_user_capture_update")
    try:
        assert changecapture.missing(connection) == ["account_user_capture_update"]
        assert sync().source == "full"
    finally:
        alter("ALTER TABLE account_user ENABLE ALWAYS TRIGGER account_user_capture_update")


@postgresql
@pytest.mark.django_db(transaction=True)
def test_every_kind_of_write_logs_the_users_it_touches():
    """Each capture path by itself: an id change logs the old id as deleted, a link moved to
    another user logs both users, renamed permissions and content types log 'full'."""
    group = Group.objects.create(name="staff")
    alice = make_legacy("alice", "alice@example.com")
    bob = make_legacy("bob", "bob@example.com")
    alice.groups.add(group)
    sync()
    assert legacy_log() == []
    User.objects.filter(pk=bob.pk).update(id=bob.pk + 1000)
    assert sorted(legacy_log()) == sorted([(bob.pk + 1000, "update"), (bob.pk, "delete")])
    sync()
    assert not NewUser.objects.filter(pk=bob.pk).exists()
    User.groups.through.objects.filter(user_id=alice.pk).update(user_id=bob.pk + 1000)
    # (bob's new id is also 'pending': the first sync took it for a new user with an email
    # still held by the old id, and rejected it, as the full compare does.)
    assert {(bob.pk + 1000, "links"), (alice.pk, "links")} <= set(legacy_log())
    sync()
    assert not NewUser.objects.get(pk=alice.pk).groups.exists()
    assert list(NewUser.objects.get(pk=bob.pk + 1000).groups.all()) == [group]
    permission = Permission.objects.first()
    codename = permission.codename
    try:
        Permission.objects.filter(pk=permission.pk).update(codename=codename + "_renamed")
        assert legacy_log() == [(0, "full")]
    finally:
        Permission.objects.filter(pk=permission.pk).update(codename=codename)
    sync()
    sync()
    content_type = permission.content_type
    try:
        type(content_type).objects.filter(pk=content_type.pk).update(model="renamed")
        assert legacy_log() == [(0, "full")]
    finally:
        type(content_type).objects.filter(pk=content_type.pk).update(model=content_type.model)
        type(content_type).objects.clear_cache()


@pytest.mark.django_db
def test_sqlite_compares_every_user_as_before():
    if connection.vendor == "postgresql":
        pytest.skip("SQLite only")
    make_legacy("alice", "alice@example.com")
    assert sync().source == "full"
    make_legacy("bob", "bob@example.com")
    result = sync()
    assert (result.source, result.copied) == ("full", 1)
    assert not legacy_log()


@postgresql
@pytest.mark.django_db(transaction=True)
def test_a_disabled_ddl_watch_counts_as_missing():
    """Commands on event triggers fire none: the sync looks at the watch itself."""
    make_legacy("alice", "alice@example.com")
    sync()
    alter(f"ALTER EVENT TRIGGER {changecapture.F_DDL} DISABLE")
    try:
        assert changecapture.missing(connection) == [changecapture.F_DDL]
        assert sync().source == "full"
    finally:
        alter(f"ALTER EVENT TRIGGER {changecapture.F_DDL} ENABLE ALWAYS")
    assert changecapture.missing(connection) == []


@postgresql
@pytest.mark.django_db(transaction=True)
def test_the_ddl_watch_leaves_other_ddl_alone():
    """A foreign key to the user table dropped (PostgreSQL drops its internal triggers on
    account_user too) logs nothing; a role that cannot see the schema still runs its DDL."""
    make_legacy("alice", "alice@example.com")
    sync()
    alter("CREATE TABLE other_order (id int, user_id bigint REFERENCES account_user (id))")
    alter("ALTER TABLE other_order DROP CONSTRAINT other_order_user_id_fkey")
    alter("DROP TABLE other_order")
    assert legacy_log() == []
    alter("CREATE ROLE review_outsider")
    try:
        with transaction.atomic():
            alter("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
            alter("SET LOCAL ROLE review_outsider")
            alter("CREATE TEMPORARY TABLE outsider_scratch (id int)")
            transaction.set_rollback(True)
    finally:
        alter("DROP ROLE review_outsider")


@postgresql
@pytest.mark.django_db(transaction=True)
def test_a_log_driven_sync_rejects_an_email_two_users_take_at_once():
    """Two copied users change their emails to one address (any case) between two syncs: both
    rejected as duplicates, as the full compare rejects them, and so are two new legacy users
    with one email; a user who keeps their email while a third takes it is not a duplicate of
    it (the third is email_taken)."""
    alice = make_legacy("alice", "alice@example.com")
    bob = make_legacy("bob", "bob@example.com")
    carol = make_legacy("carol", "carol@example.com")
    dave = make_legacy("dave", "dave@example.com")
    sync()
    User.objects.filter(pk=alice.pk).update(email="shared@example.com")
    User.objects.filter(pk=bob.pk).update(email="SHARED@example.com")
    User.objects.filter(pk=carol.pk).update(full_name="Carol Kept")  # keeps her email
    User.objects.filter(pk=dave.pk).update(email="Carol@example.com")
    erin = make_legacy("erin", "twice@example.com")  # two sign-ups on the legacy side
    frank = make_legacy("frank", "Twice@example.com")
    result = sync()
    assert result.source == "log"
    reasons = {int(r["legacy_id"]): r["reason"] for r in rejected_rows(result)}
    assert reasons == {
        alice.pk: "email_duplicate", bob.pk: "email_duplicate", dave.pk: "email_taken",
        erin.pk: "email_duplicate", frank.pk: "email_duplicate",
    }  # fmt: skip
    assert NewUser.objects.get(pk=carol.pk).full_name == "Carol Kept"


def rejected_rows(result):
    import csv

    with open(result.report, newline="") as f:
        return list(csv.DictReader(f))
