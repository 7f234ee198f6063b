"""The cut-over from deploy 1 (AUTH_USER_MODEL=account.User) to NewUser, and the way back.

Settings are read when a process starts, so each deploy is a subprocess with its own
AUTH_USER_MODEL, against a database of its own: a copy of one deploy-1 database built once
per session (PostgreSQL: CREATE DATABASE ... TEMPLATE; SQLite: a file copy). These tests do
not depend on the setting the test run itself uses; CI runs them under both.
"""

import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import HTTPCookieProcessor, build_opener

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from account.cutover import is_cut_over
from account.models import NewUser, User

from .conftest import ROOT, assert_clean_failure, database_url, subprocess_env

OLD, NEW = "account.User", "account.NewUser"
ON_POSTGRESQL = connection.settings_dict["ENGINE"].endswith("postgresql")
postgresql_only = pytest.mark.skipif(not ON_POSTGRESQL, reason="PostgreSQL path")
sqlite_only = pytest.mark.skipif(ON_POSTGRESQL, reason="SQLite path")

# Deploy 1's data: users with real passwords, a group, an admin log entry about a user.
SEED = """
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from account.models import User

editors = Group.objects.create(name="editors")
boss = User.objects.create_superuser("boss", "boss@example.com", "boss-pass")
alice = User.objects.create_user("alice", "alice@example.com", "alice-pass", phone_number="9841234567")
alice.groups.add(editors)
User.objects.create_user("bob", "bob@Example.COM", "bob-pass", phone_number="984-123-4568")
for i in range(20):
    User.objects.create_user(f"user{i}", f"user{i}@example.com", "pw", phone_number=f"98412{i:05d}")
LogEntry.objects.create(
    user=boss, content_type=ContentType.objects.get_for_model(User), object_id=str(alice.pk),
    object_repr="alice", action_flag=CHANGE, change_message="[]",
)
"""
# The project's own tables, unknown to Django: an order table and a many-to-many table.
SHOP = [
    """CREATE TABLE shop_order (id bigserial PRIMARY KEY,
        user_id bigint NOT NULL REFERENCES account_user (id) ON DELETE CASCADE,
        total integer NOT NULL)""",
    "INSERT INTO shop_order (user_id, total) SELECT id, 10 FROM account_user",
    """CREATE TABLE shop_team_members (id bigserial PRIMARY KEY, team_id integer NOT NULL,
        user_id bigint NOT NULL REFERENCES account_user (id) DEFERRABLE INITIALLY DEFERRED,
        UNIQUE (team_id, user_id))""",
    "INSERT INTO shop_team_members (team_id, user_id) SELECT 1, id FROM account_user",
]


class Deploy:
    """One database and the commands each deploy runs against it."""

    def __init__(self, url, tmp_path):
        self.url = url
        self.tmp_path = tmp_path

    def env(self, model, **extra):
        paths = {"REPORT_DIR": self.tmp_path / "reports", "BACKUP_DIR": self.tmp_path / "backups"}
        return subprocess_env(self.url, AUTH_USER_MODEL=model, **{**paths, **extra})

    def manage(self, model, *args, timeout=120, **env):
        """Run `manage.py ARGS` as that deploy; `env` overrides its settings."""
        return subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env(model, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, model, *args):
        proc = self.manage(model, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def python(self, model, code):
        """Run Django code in a process of that deploy (as the app would)."""
        return self.ok(model, "shell", "-c", code)

    def cutover(self, *args):
        return self.ok(NEW, "cutover", *args)

    def rollback(self, *args):
        return self.ok(OLD, "cutover_rollback", *args)

    def popen(self, model, *args):
        return subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env(model),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def connect(self):
        if self.url.startswith("sqlite"):
            return sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None)
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def sql(self, query, params=()):
        conn = self.connect()
        if self.url.startswith("sqlite"):
            query = query.replace("%s", "?")
        try:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else cursor.rowcount
        finally:
            conn.close()

    def one(self, query, params=()):
        return self.sql(query, params)[0][0]

    def definitions(self, *tables):
        """{table: (constraint name, pg_get_constraintdef)} of each table's foreign key to a
        user table (PostgreSQL)."""
        return {
            table: tuple(row)
            for table in tables
            for row in self.sql(
                """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
                   WHERE contype = 'f' AND conrelid = %s::regclass
                   AND confrelid IN ('account_user'::regclass, 'account_newuser'::regclass)""",
                [table],
            )
        }

    def references(self, table):
        """The user table each foreign key of `table` references (PostgreSQL)."""
        return self.sql(
            """SELECT confrelid::regclass::text, conname, convalidated FROM pg_constraint
               WHERE contype = 'f' AND conrelid = %s::regclass
               AND confrelid IN ('account_user'::regclass, 'account_newuser'::regclass)""",
            [table],
        )

    def user_id(self, username):
        return self.one("SELECT id FROM account_user WHERE username = %s", [username])


def _admin_url():
    return database_url({**connection.settings_dict, "NAME": "postgres"})


@pytest.fixture(scope="session")
def deploy1_template(tmp_path_factory):
    """A deploy-1 database: migrated under account.User, seeded, copied into NewUser."""
    tmp = tmp_path_factory.mktemp("deploy1")
    if ON_POSTGRESQL:
        import psycopg

        name = f"tpl_cutover_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = database_url({**connection.settings_dict, "NAME": name})
    else:
        url = f"sqlite:///{tmp / 'deploy1.sqlite3'}"
    deploy = Deploy(url, tmp)
    try:
        deploy.ok(OLD, "migrate", "--no-input", "-v", "0")
        deploy.python(OLD, SEED)
        deploy.ok(OLD, "copy_users")
        if ON_POSTGRESQL:
            for statement in SHOP:
                deploy.sql(statement)
        yield url
    finally:
        if ON_POSTGRESQL:
            with psycopg.connect(_admin_url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def deploy(deploy1_template, tmp_path):
    """A fresh copy of the deploy-1 database for one test."""
    if not ON_POSTGRESQL:
        path = tmp_path / "db.sqlite3"
        shutil.copy(deploy1_template.removeprefix("sqlite:///"), path)
        yield Deploy(f"sqlite:///{path}", tmp_path)
        return
    import psycopg

    name = f"cutover_{uuid.uuid4().hex[:12]}"
    template = deploy1_template.rsplit("/", 1)[1]
    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield Deploy(database_url({**connection.settings_dict, "NAME": name}), tmp_path)
    finally:
        with psycopg.connect(_admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def legacy_user(deploy, username, email, **fields):
    """Insert a legacy user as the old app would (deploy 1), by SQL."""
    values = {
        "password": "!unusable",
        "last_login": None,
        "is_superuser": False,
        "username": username,
        "email": email,
        "full_name": "",
        "date_of_birth": None,
        "phone_number": "",
        "is_active": True,
        "is_staff": False,
        **fields,
    }
    deploy.sql(
        f"INSERT INTO account_user ({', '.join(values)}) "
        f"VALUES ({', '.join(['%s'] * len(values))})",
        list(values.values()),
    )
    return deploy.user_id(username)


# --- deploy 1 itself ----------------------------------------------------------------------------


@postgresql_only
def test_deploy_1_builds_the_admin_log_against_the_legacy_table(deploy):
    assert [r[0] for r in deploy.references("django_admin_log")] == ["account_user"]


def test_only_the_live_user_model_is_writable_in_the_admin(admin_client):
    """Runs under either setting: the AUTH_USER_MODEL is editable, the other one view-only."""
    live = get_user_model()
    other = User if live is NewUser else NewUser
    assert admin_client.get(f"/admin/account/{live._meta.model_name}/add/").status_code == 200
    assert admin_client.get(f"/admin/account/{other._meta.model_name}/add/").status_code == 403
    assert admin_client.get(f"/admin/account/{other._meta.model_name}/").status_code == 200


@pytest.mark.django_db
def test_staff_sign_in_to_the_admin_with_the_live_user_model(client):
    """Runs under either setting (CI runs this file under both)."""
    get_user_model().objects.create_superuser(username="root", email="r@example.com", password="pw")
    response = client.post("/admin/login/?next=/admin/", {"username": "root", "password": "pw"})
    assert response.status_code == 302 and response.url == "/admin/"
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_the_test_database_is_not_cut_over():
    assert not is_cut_over()


# --- the cut-over -------------------------------------------------------------------------------


@postgresql_only
def test_cutover_repoints_the_admin_log_and_the_projects_own_tables(deploy):
    deploy.cutover()
    for table in ("django_admin_log", "shop_order", "shop_team_members"):
        assert [(r[0], r[2]) for r in deploy.references(table)] == [("account_newuser", True)]
    # The legacy model's own links stay with it.
    assert deploy.references("account_user_groups")[0][0] == "account_user"


@postgresql_only
def test_after_the_cutover_rows_can_reference_a_new_signup(deploy):
    deploy.cutover()
    signup = deploy.python(
        NEW,
        "from account.models import NewUser as U; print(U.objects.create_user('new', 'new@example.com', 'pw').pk)",
    ).split()[-1]
    deploy.sql("INSERT INTO shop_order (user_id, total) VALUES (%s, 1)", [int(signup)])
    assert deploy.one("SELECT COUNT(*) FROM shop_order WHERE user_id = %s", [int(signup)]) == 1


def test_admin_log_entries_move_to_the_newuser_content_type(deploy):
    deploy.cutover()
    out = deploy.python(
        NEW,
        "from django.contrib.admin.models import LogEntry\n"
        "e = LogEntry.objects.get(object_repr='alice')\n"
        "print(e.content_type.model, e.get_edited_object().username, e.user.username)",
    )
    assert out.split()[-3:] == ["newuser", "alice", "boss"]


def test_the_legacy_table_is_read_only_after_the_cutover(deploy):
    deploy.cutover()
    proc = deploy.manage(
        OLD,
        "shell",
        "-c",
        "from account.models import User; User.objects.filter(username='bob').update(is_staff=True)",
    )
    assert proc.returncode != 0
    assert "account_user is read-only: the cut-over to account.NewUser ran at" in proc.stderr
    assert "make cutover-rollback" in proc.stderr
    assert deploy.one("SELECT is_staff FROM account_user WHERE username = 'bob'") in (False, 0)


def test_the_cutover_carries_legacy_changes_made_since_the_last_sync(deploy):
    carol = legacy_user(deploy, "carol", "carol@example.com")
    deploy.cutover()
    assert deploy.one("SELECT username FROM account_newuser WHERE id = %s", [carol]) == "carol"


def test_the_cutover_carries_a_ban_a_password_change_and_a_deletion(deploy):
    if ON_POSTGRESQL:  # the project's own rows go with the user, as its app would delete them
        for table in ("shop_order", "shop_team_members"):
            deploy.sql(
                f"DELETE FROM {table} WHERE user_id = "
                "(SELECT id FROM account_user WHERE username = 'user7')"
            )
    deploy.python(
        OLD,
        "from account.models import User\n"
        "alice = User.objects.get(username='alice'); alice.set_password('new-pass'); alice.save()\n"
        "User.objects.filter(username='bob').update(is_active=False)\n"
        "User.objects.filter(username='user7').delete()",
    )
    deploy.cutover()
    out = deploy.python(
        NEW,
        "from django.contrib.auth import authenticate\n"
        "from account.models import NewUser\n"
        "print(authenticate(username='alice', password='new-pass') is not None,"
        " authenticate(username='alice', password='alice-pass') is None,"
        " NewUser.objects.get(username='bob').is_active,"
        " NewUser.objects.filter(username='user7').exists())",
    )
    assert out.split()[-4:] == ["True", "True", "False", "False"]


def test_the_sync_refuses_after_the_cutover_naming_the_way_back(deploy):
    deploy.cutover()
    proc = deploy.manage(NEW, "copy_users")
    assert_clean_failure(proc, "The cut-over is done", "make cutover-rollback")


def test_the_cutover_is_recorded_and_shown_on_the_status_page(deploy):
    deploy.cutover()
    out = deploy.python(
        NEW,
        "from django.test import Client\n"
        "from django.test.utils import setup_test_environment; setup_test_environment()\n"
        "from account.models import NewUser\n"
        "c = Client(); c.force_login(NewUser.objects.get(username='boss'))\n"
        "print(c.get('/status/').content.decode())",
    )
    assert "AUTH_USER_MODEL: account.NewUser." in out
    assert "Last cut-over:" in out
    assert "django_admin_log(user_id)" in out


def test_running_the_cutover_again_changes_nothing_and_says_so(deploy):
    deploy.cutover()
    backups = sorted((deploy.tmp_path / "backups").iterdir())
    out = deploy.cutover()
    assert "Already cut over (cut-over at" in out
    assert "nothing changed" in out
    assert sorted((deploy.tmp_path / "backups").iterdir()) == backups


@postgresql_only
def test_dry_run_lists_what_would_move_and_changes_nothing(deploy):
    out = deploy.cutover("--dry-run")
    assert "3 foreign keys to move: django_admin_log(user_id), shop_order(user_id), " in out
    assert "Dry run: nothing was changed." in out
    assert deploy.references("shop_order")[0][0] == "account_user"
    assert not (deploy.tmp_path / "backups").exists()


@postgresql_only
def test_cutover_prints_how_long_writers_were_blocked(deploy):
    out = deploy.cutover()
    assert "Writers were blocked for " in out
    assert "(switch: final sync " in out


@postgresql_only
def test_cutover_keeps_each_constraints_definition_but_the_table_it_references(deploy):
    tables = ("django_admin_log", "shop_order", "shop_team_members")
    before = deploy.definitions(*tables)
    assert "ON DELETE CASCADE" in before["shop_order"][1]
    assert "DEFERRABLE INITIALLY DEFERRED" in before["shop_team_members"][1]
    deploy.cutover()
    after = deploy.definitions(*tables)
    assert {t: d for t, (_, d) in after.items()} == {
        t: d.replace("REFERENCES account_user(", "REFERENCES account_newuser(")
        for t, (_, d) in before.items()
    }


@postgresql_only
def test_cutover_and_rollback_move_a_foreign_key_in_another_schema(deploy):
    deploy.sql("CREATE SCHEMA crm")
    deploy.sql(
        "CREATE TABLE crm.contact (id serial PRIMARY KEY, "
        "user_id bigint NOT NULL REFERENCES account_user (id))"
    )
    deploy.sql("INSERT INTO crm.contact (user_id) SELECT id FROM account_user")
    before = deploy.references("crm.contact")
    out = deploy.cutover("-v", "2")
    assert "crm.contact(user_id) now references account_newuser" in out
    assert [(r[0], r[2]) for r in deploy.references("crm.contact")] == [("account_newuser", True)]
    deploy.rollback()
    assert deploy.references("crm.contact") == before


@postgresql_only
def test_the_legacy_link_tables_refuse_deletes_and_truncate_after_the_cutover(deploy):
    import psycopg

    deploy.cutover()
    for statement in (
        "DELETE FROM account_user_groups",
        "TRUNCATE account_user_groups",
        "TRUNCATE account_user_user_permissions",
        "TRUNCATE account_user CASCADE",
    ):
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="is read-only"):
            deploy.sql(statement)
    assert deploy.one("SELECT COUNT(*) FROM account_user_groups") == 1


def test_deleting_a_group_after_the_cutover_takes_its_legacy_links_with_it(deploy):
    deploy.cutover()
    deploy.python(
        NEW,
        "from django.contrib.auth.models import Group; Group.objects.get(name='editors').delete()",
    )
    assert deploy.one("SELECT COUNT(*) FROM account_user_groups") == 0


# --- refusals -----------------------------------------------------------------------------------


def test_cutover_under_the_old_setting_names_the_setting_to_use(deploy):
    proc = deploy.manage(OLD, "cutover")
    assert_clean_failure(proc, "runs with AUTH_USER_MODEL=account.NewUser")
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


def test_rollback_under_the_new_setting_names_the_setting_to_use(deploy):
    deploy.cutover()
    proc = deploy.manage(NEW, "cutover_rollback")
    assert_clean_failure(proc, "runs with AUTH_USER_MODEL=account.User")
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
def test_cutover_with_a_bad_lock_timeout_ends_in_one_line(deploy, value):
    proc = deploy.manage(NEW, "cutover", "--lock-timeout", value)
    assert_clean_failure(proc, "cutover: error: argument --lock-timeout:")
    assert proc.returncode == 2
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


def test_cutover_on_a_database_never_migrated_says_to_migrate(fresh_database_url, tmp_path):
    proc = Deploy(fresh_database_url, tmp_path).manage(NEW, "cutover")
    assert_clean_failure(proc, "run `python manage.py migrate` first")


def test_cutover_with_the_database_down_ends_in_one_line(tmp_path):
    url = (
        "postgres://postgres@127.0.0.1:1/nothing"
        if ON_POSTGRESQL
        else "sqlite:///" + str(tmp_path / "missing" / "db.sqlite3")
    )
    proc = Deploy(url, tmp_path).manage(NEW, "cutover")
    assert_clean_failure(proc, "Database error")
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


@postgresql_only
def test_cutover_refuses_when_a_row_references_a_legacy_user_the_copy_rejects(deploy):
    bad = legacy_user(deploy, "broken", "not-an-email")
    deploy.sql("INSERT INTO shop_order (user_id, total) VALUES (%s, 1), (%s, 2)", [bad, bad])
    proc = deploy.manage(NEW, "cutover", "--skip-invalid")
    assert_clean_failure(proc, "2 rows in shop_order(user_id) reference legacy users who are not")
    assert "Nothing was changed." in proc.stderr
    assert deploy.references("shop_order")[0][0] == "account_user"
    assert not deploy.one("SELECT COUNT(*) FROM pg_trigger WHERE tgname LIKE '%%read_only%%'")


@postgresql_only
def test_cutover_under_the_default_policy_refuses_rejected_legacy_users(deploy):
    legacy_user(deploy, "broken", "not-an-email")
    proc = deploy.manage(NEW, "cutover")
    assert_clean_failure(proc, "The sync refused; the cut-over changed nothing")
    assert deploy.references("django_admin_log")[0][0] == "account_user"


@postgresql_only
def test_cutover_lists_other_generic_references_to_legacy_users(deploy):
    ct = deploy.one(
        "SELECT id FROM django_content_type WHERE app_label = 'account' AND model = 'user'"
    )
    deploy.sql(
        "CREATE TABLE shop_comment (id serial PRIMARY KEY, content_type_id integer, object_id text)"
    )
    deploy.sql("INSERT INTO shop_comment (content_type_id, object_id) VALUES (%s, '2')", [ct])
    out = deploy.cutover("--dry-run")
    assert "note: 1 rows of shop_comment(content_type_id, object_id) point at legacy users" in out


@postgresql_only
def test_cutover_lists_generic_references_by_object_pk(deploy):
    """django-guardian's per-object permissions name the object's id object_pk."""
    ct = deploy.one(
        "SELECT id FROM django_content_type WHERE app_label = 'account' AND model = 'user'"
    )
    deploy.sql(
        "CREATE TABLE shop_userobjectpermission (id serial PRIMARY KEY, "
        "content_type_id integer NOT NULL, object_pk varchar(255) NOT NULL)"
    )
    deploy.sql(
        "INSERT INTO shop_userobjectpermission (content_type_id, object_pk) VALUES (%s, '2')", [ct]
    )
    out = deploy.cutover("--dry-run")
    assert (
        "note: 1 rows of shop_userobjectpermission(content_type_id, object_pk) point at legacy"
        in out
    )


@postgresql_only
def test_cutover_gives_up_in_one_line_when_the_old_app_still_writes(deploy):
    import psycopg

    with psycopg.connect(deploy.url) as writer:
        writer.execute("LOCK TABLE account_user IN ROW EXCLUSIVE MODE")  # an open write
        proc = deploy.manage(NEW, "cutover", "--lock-timeout", "1")
    assert_clean_failure(proc, "Could not lock the tables within 1 s", "nothing was changed")
    assert deploy.references("django_admin_log")[0][0] == "account_user"


@postgresql_only
def test_cutover_refuses_a_foreign_key_to_columns_newuser_has_no_unique_key_on(deploy):
    deploy.sql("ALTER TABLE account_user ADD CONSTRAINT account_user_id_name UNIQUE (id, username)")
    deploy.sql(
        "CREATE TABLE crm_note (id serial PRIMARY KEY, user_id bigint, username varchar(150), "
        "CONSTRAINT crm_note_author FOREIGN KEY (user_id, username) "
        "REFERENCES account_user (id, username))"
    )
    proc = deploy.manage(NEW, "cutover")
    assert_clean_failure(proc, "Cannot re-point crm_note_author on crm_note", "(id, username)")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert deploy.references("crm_note")[0][0] == "account_user"


@postgresql_only
def test_a_database_error_in_the_switch_ends_in_one_line_and_changes_nothing(deploy):
    deploy.sql(
        "CREATE FUNCTION append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the admin log is append-only'; END $$"
    )
    deploy.sql(
        "CREATE TRIGGER append_only BEFORE UPDATE ON django_admin_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION append_only()"
    )
    proc = deploy.manage(NEW, "cutover")
    assert_clean_failure(proc, "(the admin log is append-only); it was rolled back")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert deploy.references("shop_order")[0][0] == "account_user"
    assert not deploy.one("SELECT COUNT(*) FROM pg_trigger WHERE tgname LIKE '%%read_only%%'")


def test_cutover_with_an_unwritable_backup_dir_ends_in_one_line(deploy):
    (deploy.tmp_path / "a-file").write_text("")
    proc = deploy.manage(NEW, "cutover", BACKUP_DIR=deploy.tmp_path / "a-file" / "backups")
    assert_clean_failure(proc, "The backup failed", "Cannot write a backup into")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not is_cut_over_in(deploy)


@postgresql_only
def test_the_swap_waits_for_all_its_locks_in_one_statement_before_changing_anything(deploy):
    import psycopg

    blocker = psycopg.connect(deploy.url)
    blocker.execute("LOCK TABLE shop_team_members IN ROW EXCLUSIVE MODE")  # the last table
    proc = deploy.popen(NEW, "cutover", "--lock-timeout", "60")
    try:
        _wait_for_lock_wait(deploy, SWAP_LOCK, proc, timeout=30)
        waiting = deploy.one(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        for table in ("account_user", "django_admin_log", "shop_order", "shop_team_members"):
            assert f'"{table}"' in waiting or f" {table}" in waiting, waiting
    finally:
        proc.kill()
        proc.wait()
        blocker.close()


# --- kill -9 ------------------------------------------------------------------------------------


SWAP_LOCK = "LOCK TABLE %ACCESS EXCLUSIVE MODE"  # the swap's lock statement (ILIKE pattern)


def _wait_for_lock_wait(deploy, query_start, proc, timeout=60):
    """Until the command's session waits for a lock in a statement starting with `query_start`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if deploy.one(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query ILIKE %s",
            [query_start + "%"],
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"the command never waited in {query_start!r}")


def _wait_until_sessions_end(deploy):
    """A killed client's session ends once it finishes its statement and finds nobody."""
    for _ in range(200):
        if (
            deploy.one(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
            == 0
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the killed command's session did not end")


def _kill_9_while_it_waits_for_the_swap_lock(deploy, settings, command):
    """Run `command` while an open transaction holds shop_order, kill -9 it as it waits for
    the swap's LOCK TABLE, then let the blocker and the killed sessions go."""
    import psycopg

    blocker = psycopg.connect(deploy.url)
    blocker.execute("LOCK TABLE shop_order IN ROW EXCLUSIVE MODE")
    proc = deploy.popen(settings, command, "--lock-timeout", "60")
    _wait_for_lock_wait(deploy, SWAP_LOCK, proc)
    proc.kill()
    proc.wait()
    blocker.close()
    _wait_until_sessions_end(deploy)


@postgresql_only
def test_kill_9_in_the_switch_leaves_the_database_as_before_and_a_rerun_completes(deploy):

    carol = legacy_user(deploy, "carol", "carol@example.com")  # for the syncs to carry
    # The switch stops at the swap's LOCK TABLE, after the final sync in the same transaction.
    _kill_9_while_it_waits_for_the_swap_lock(deploy, NEW, "cutover")

    assert deploy.references("django_admin_log")[0][0] == "account_user"
    assert deploy.references("shop_order")[0][0] == "account_user"
    assert not deploy.one("SELECT COUNT(*) FROM pg_trigger WHERE tgname LIKE '%%read_only%%'")
    assert not deploy.one("SELECT COUNT(*) FROM account_operationlog WHERE kind = 'cutover'")
    # The unlocked sync before the switch had committed: carol is in NewUser either way.
    assert deploy.one("SELECT COUNT(*) FROM account_newuser WHERE id = %s", [carol]) == 1

    out = deploy.cutover()
    assert "Cut over to account.NewUser: 3 foreign keys re-pointed" in out
    assert [(r[0], r[2]) for r in deploy.references("shop_order")] == [("account_newuser", True)]


def _cutover_held_at_validate(deploy, lock_timeout):
    """Start a cut-over whose switch goes through but whose VALIDATE on shop_order waits for a
    lock; returns the process and the connection holding that lock (close it to let go)."""
    import psycopg

    first = psycopg.connect(deploy.url)
    first.execute("LOCK TABLE shop_order IN ROW EXCLUSIVE MODE")
    proc = deploy.popen(NEW, "cutover", "--lock-timeout", str(lock_timeout))
    _wait_for_lock_wait(deploy, SWAP_LOCK, proc)
    # Queue a lock that lets the switch through but holds up VALIDATE on shop_order.
    second = psycopg.connect(deploy.url)
    queued = threading.Thread(
        target=second.execute, args=("LOCK TABLE shop_order IN SHARE UPDATE EXCLUSIVE MODE",)
    )
    queued.start()
    time.sleep(0.2)
    first.close()
    queued.join(timeout=30)
    return proc, second


@postgresql_only
def test_kill_9_in_the_validation_leaves_the_cutover_done_and_a_rerun_validates(deploy):
    proc, second = _cutover_held_at_validate(deploy, 60)
    _wait_for_lock_wait(deploy, "ALTER TABLE shop_order VALIDATE", proc)
    proc.kill()
    proc.wait()
    second.close()
    _wait_until_sessions_end(deploy)

    assert deploy.one("SELECT COUNT(*) FROM pg_trigger WHERE tgname = 'account_user_read_only'")
    assert [(r[0], r[2]) for r in deploy.references("shop_order")] == [("account_newuser", False)]
    out = deploy.cutover()
    # shop_order and shop_team_members (validated after it) were left; the admin log was done.
    assert "The earlier cut-over is complete now: 2 validated." in out
    assert [(r[0], r[2]) for r in deploy.references("shop_order")] == [("account_newuser", True)]


@postgresql_only
def test_a_validation_that_waits_past_the_lock_timeout_ends_in_one_line_and_a_rerun_validates(
    deploy,
):
    proc, second = _cutover_held_at_validate(deploy, 5)
    output, _ = proc.communicate(timeout=120)
    second.close()
    proc.stdout, proc.stderr = output, ""
    assert_clean_failure(
        proc, "itself is done, but validating", "waited more than 5 s for a lock",
        "Run the same command again",
    )  # fmt: skip
    assert [(r[0], r[2]) for r in deploy.references("shop_order")] == [("account_newuser", False)]
    assert "2 validated" in deploy.cutover()
    assert [(r[0], r[2]) for r in deploy.references("shop_order")] == [("account_newuser", True)]


@postgresql_only
def test_kill_9_in_the_rollback_leaves_it_cut_over_and_a_rerun_completes(deploy):

    deploy.cutover()
    signup = int(deploy.python(NEW, WRITES_AFTER_THE_CUTOVER).split()[-1])
    _kill_9_while_it_waits_for_the_swap_lock(deploy, OLD, "cutover_rollback")

    assert deploy.one("SELECT COUNT(*) FROM pg_trigger WHERE tgname = 'account_user_read_only'")
    assert deploy.references("shop_order")[0][0] == "account_newuser"
    assert not deploy.one("SELECT COUNT(*) FROM account_user WHERE id = %s", [signup])
    assert not deploy.one("SELECT COUNT(*) FROM account_operationlog WHERE kind = 'rollback'")

    out = deploy.rollback()
    assert "Rolled back to account.User: carried back 1 signups" in out
    assert deploy.one("SELECT COUNT(*) FROM account_user WHERE id = %s", [signup]) == 1
    assert [(r[0], r[2]) for r in deploy.references("shop_order")] == [("account_user", True)]


# --- the way back -------------------------------------------------------------------------------

WRITES_AFTER_THE_CUTOVER = """
from django.contrib.auth.models import Group
from django.db import connection
from account.models import NewUser
signup = NewUser.objects.create_user("dave", "dave@example.com", "dave-pass", phone_number="+12015550123")
alice = NewUser.objects.get(username="alice")
alice.set_password("alice-new-pass")
alice.save()
NewUser.objects.filter(username="bob").update(email="bob@new.example.com", is_staff=True)
alice.groups.clear()
NewUser.objects.get(username="user3").groups.add(Group.objects.create(name="new-group"))
gone = NewUser.objects.get(username="user5")
with connection.cursor() as cursor:  # the project's own rows of that user go first
    for table in {"shop_order", "shop_team_members"} & set(connection.introspection.table_names()):
        cursor.execute(f"DELETE FROM {table} WHERE user_id = %s", [gone.pk])
gone.delete()
print("signup", signup.pk)
"""


def test_rollback_carries_the_new_sides_writes_back(deploy):
    deploy.cutover()
    signup = int(deploy.python(NEW, WRITES_AFTER_THE_CUTOVER).split()[-1])
    deploy.rollback()
    check = deploy.python(
        OLD,
        "from account.models import User\n"
        "dave = User.objects.get(username='dave')\n"
        "alice = User.objects.get(username='alice')\n"
        "bob = User.objects.get(username='bob')\n"
        "print(dave.pk, dave.check_password('dave-pass'), dave.phone_number)\n"
        "print(alice.check_password('alice-new-pass'), list(alice.groups.values_list('name', flat=True)))\n"
        "print(bob.email, bob.is_staff, bob.phone_number)\n"
        "print(list(User.objects.get(username='user3').groups.values_list('name', flat=True)))\n"
        "print(User.objects.filter(username='user5').exists())\n",
    ).splitlines()[-5:]
    assert check == [
        f"{signup} True +12015550123",
        "True []",
        "bob@new.example.com True 984-123-4568",  # unchanged values keep their legacy form
        "['new-group']",
        "False",
    ]


def test_rollback_moves_the_legacy_sequence_past_the_signups(deploy):
    deploy.cutover()
    signup = int(deploy.python(NEW, WRITES_AFTER_THE_CUTOVER).split()[-1])
    deploy.rollback()
    out = deploy.python(
        OLD, "from account.models import User; print(User.objects.create_user('eve').pk)"
    )
    assert int(out.split()[-1]) > signup


@postgresql_only
def test_rollback_restores_the_foreign_keys_with_their_names_and_the_writable_table(deploy):
    before = {t: deploy.references(t) for t in ("django_admin_log", "shop_order")}
    deploy.cutover()
    deploy.rollback()
    assert {t: deploy.references(t) for t in before} == before
    legacy = "('account_user', 'account_user_groups', 'account_user_user_permissions')"
    assert not deploy.one(
        "SELECT COUNT(*) FROM pg_trigger WHERE tgname LIKE '%%read_only%%' "
        f"AND tgrelid::regclass::text IN {legacy}"
    )
    assert deploy.one("SELECT content_type_id FROM django_admin_log") == deploy.one(
        "SELECT id FROM django_content_type WHERE app_label = 'account' AND model = 'user'"
    )


def test_rollback_refuses_a_value_the_legacy_schema_cannot_hold(deploy):
    deploy.cutover()
    deploy.sql(
        "UPDATE account_newuser SET phone_number = %s WHERE username = 'bob'",
        ["+4930123456789012"],
    )
    bob = deploy.user_id("bob")
    for args in ((), ("--skip-invalid",)):  # leaving bob out would drop his new-side changes
        proc = deploy.manage(OLD, "cutover_rollback", *args)
        assert_clean_failure(
            proc, "1 users the legacy table holds have new-side changes it cannot take",
            f"(ids {bob}; phone_number_too_long: 1;",
        )  # fmt: skip
        assert is_cut_over_in(deploy)


def test_rollback_with_skip_invalid_leaves_a_signup_out_and_reports_it(deploy):
    deploy.cutover()
    zed = _new_signup(deploy, "zed")
    _make_phone_too_long(deploy, "zed")
    deploy.sql("UPDATE account_newuser SET is_staff = %s WHERE username = 'bob'", [True])
    out = deploy.rollback("--skip-invalid")
    assert "1 new users stay out of the legacy table (phone_number_too_long: 1)" in out
    assert not deploy.one("SELECT COUNT(*) FROM account_user WHERE id = %s", [zed])
    assert deploy.one("SELECT is_staff FROM account_user WHERE username = 'bob'") in (True, 1)


def test_rollback_when_not_cut_over_changes_nothing_and_says_so(deploy):
    out = deploy.rollback()
    assert "Not cut over, the legacy table is live: nothing to roll back, nothing changed." in out


def test_a_second_cutover_after_a_rollback_works(deploy):
    deploy.cutover()
    deploy.python(NEW, WRITES_AFTER_THE_CUTOVER)
    deploy.rollback()
    deploy.ok(OLD, "copy_users")
    out = deploy.cutover()
    assert "Cut over to account.NewUser" in out
    assert is_cut_over_in(deploy)


def is_cut_over_in(deploy) -> bool:
    out = deploy.python(NEW, "from account.cutover import is_cut_over; print(is_cut_over())")
    return out.split()[-1] == "True"


# --- sessions -----------------------------------------------------------------------------------


class Gunicorn:
    """gunicorn as the container runs it, for one deploy."""

    def __init__(self, deploy, model):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = deploy.env(
            model,
            PORT=port,
            WEB_CONCURRENCY=1,
            DEBUG="off",
            SECRET_KEY="cutover-test-key-" + "k" * 50,  # the same in both deploys
            ALLOWED_HOSTS="127.0.0.1",
            SECURE_SSL_REDIRECT="off",
            SESSION_COOKIE_SECURE="off",
            CSRF_COOKIE_SECURE="off",
        )
        gunicorn = Path(sys.executable).parent / "gunicorn"
        self.proc = subprocess.Popen(
            [gunicorn, "--config", "config/gunicorn.py", "config.wsgi"], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                build_opener().open(f"{self.url}/health/", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "no gunicorn"
                time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=15)


def _sign_in(opener, jar, url, username, password):
    opener.open(f"{url}/login/")
    token = next(c.value for c in jar if c.name == "csrftoken")
    form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
    return opener.open(f"{url}/login/", data=urlencode(form).encode()).read().decode()


def _account_page(opener, url):
    """The account page, or None when the session is not signed in (redirect to login)."""
    try:
        response = opener.open(f"{url}/account/me/")
    except HTTPError:
        return None
    return response.read().decode() if "/login/" not in response.url else None


@pytest.mark.slow
@postgresql_only
def test_a_session_signed_in_under_deploy_1_is_still_signed_in_after_the_cutover(deploy):
    jar = CookieJar()
    opener = build_opener(HTTPCookieProcessor(jar))
    old_app = Gunicorn(deploy, OLD)
    try:
        page = _sign_in(opener, jar, old_app.url, "alice", "alice-pass")
        assert 'id="username">alice<' in page
    finally:
        old_app.stop()

    deploy.cutover()

    new_app = Gunicorn(deploy, NEW)
    try:
        page = _account_page(opener, new_app.url)
        assert page is not None, "the session did not survive the cut-over"
        assert 'id="username">alice<' in page
        jar.clear()
        assert _account_page(opener, new_app.url) is None  # without the cookie: signed out
    finally:
        new_app.stop()


# --- SQLite -------------------------------------------------------------------------------------


@sqlite_only
def test_sqlite_rebuilds_the_admin_log_to_reference_newuser(deploy):
    deploy.cutover()
    tables = {row[2] for row in deploy.sql("PRAGMA foreign_key_list(django_admin_log)")}
    assert "account_newuser" in tables and "account_user" not in tables


@sqlite_only
def test_sqlite_rollback_rebuilds_it_back(deploy):
    deploy.cutover()
    deploy.rollback()
    tables = {row[2] for row in deploy.sql("PRAGMA foreign_key_list(django_admin_log)")}
    assert "account_user" in tables and "account_newuser" not in tables


@sqlite_only
def test_sqlite_refuses_a_table_django_does_not_know_in_one_line(deploy):
    deploy.sql(
        "CREATE TABLE shop_order (id integer PRIMARY KEY, "
        "user_id bigint NOT NULL REFERENCES account_user (id))"
    )
    proc = deploy.manage(NEW, "cutover")
    assert_clean_failure(proc, "SQLite cannot re-point shop_order(user_id) to account_newuser")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_cutover_demo_tells_the_whole_story(fresh_database_url, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo_cutover.py"), "60"],
        cwd=ROOT,
        env=subprocess_env(
            fresh_database_url, REPORT_DIR=tmp_path / "reports", BACKUP_DIR=tmp_path / "b"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("GET /account/me/ -> 200", "the cut-over's sync carried the ban",
                 "the cut-over's sync carried them", "refused: account_user is read-only"):  # fmt: skip
        assert line in proc.stdout, proc.stdout


def test_undoing_the_copy_after_the_cutover_is_refused(deploy):
    deploy.cutover()
    proc = deploy.manage(NEW, "migrate", "account", "0001")
    assert_clean_failure(proc, "the cut-over is done", "make cutover-rollback")
    assert deploy.one("SELECT COUNT(*) FROM account_newuser") > 0


# --- the way back: what the review found --------------------------------------------------------


def _make_phone_too_long(deploy, username):
    """A NewUser value the legacy schema cannot hold (its phone column has 15 characters)."""
    deploy.sql(
        "UPDATE account_newuser SET phone_number = %s WHERE username = %s",
        ["+4930123456789012", username],
    )


def _new_signup(deploy, username):
    return int(
        deploy.python(
            NEW,
            "from account.models import NewUser\n"
            f"print(NewUser.objects.create_user('{username}', '{username}.new@example.com', 'x').pk)",
        ).split()[-1]
    )


def test_after_a_rollback_a_new_legacy_user_never_takes_the_id_of_a_user_left_out(deploy):
    deploy.cutover()
    left_out = _new_signup(deploy, "zed")
    _make_phone_too_long(deploy, "zed")
    deploy.rollback("--skip-invalid")
    new = int(
        deploy.python(
            OLD, "from account.models import User; print(User.objects.create_user('eve').pk)"
        ).split()[-1]
    )
    assert new > left_out
    assert not deploy.one("SELECT COUNT(*) FROM account_newuser WHERE id = %s", [new])


def test_the_rollback_never_hands_out_the_id_of_a_deleted_user_again(deploy):
    deploy.cutover()
    last = deploy.one("SELECT MAX(id) FROM account_newuser")
    deploy.python(
        NEW,
        "from django.db import connection\n"
        "from account.models import NewUser\n"
        "with connection.cursor() as cursor:\n"
        "    if 'shop_team_members' in connection.introspection.table_names():\n"
        f"        cursor.execute('DELETE FROM shop_team_members WHERE user_id = {last}')\n"
        f"NewUser.objects.filter(pk={last}).delete()",
    )
    deploy.rollback()
    new = int(
        deploy.python(
            OLD, "from account.models import User; print(User.objects.create_user('eve').pk)"
        ).split()[-1]
    )
    assert new > last


def test_rollback_refuses_when_newuser_is_empty(deploy):
    deploy.cutover()
    if ON_POSTGRESQL:  # as only an administrator can: the change log refuses TRUNCATE
        deploy.sql("SET session_replication_role = replica; TRUNCATE account_newuser CASCADE")
    else:
        deploy.sql("DELETE FROM account_newuser")
    proc = deploy.manage(OLD, "cutover_rollback", "--allow-mass-delete")
    assert_clean_failure(proc, "account_newuser is empty", "Nothing was changed.")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert deploy.one("SELECT COUNT(*) FROM account_user") == 23
    assert is_cut_over_in(deploy)


DELETE_ELEVEN_NEW_USERS = """
from django.db import connection
from account.models import NewUser
gone = NewUser.objects.filter(username__regex=r"^user1[0-9]?$")
with connection.cursor() as cursor:
    if "shop_team_members" in connection.introspection.table_names():
        ids = ",".join(str(pk) for pk in gone.values_list("pk", flat=True))
        cursor.execute(f"DELETE FROM shop_team_members WHERE user_id IN ({ids})")
print(gone.delete())
"""


def test_rollback_refuses_to_delete_many_legacy_users_without_allow_mass_delete(deploy):
    deploy.cutover()
    deploy.python(NEW, DELETE_ELEVEN_NEW_USERS)
    proc = deploy.manage(OLD, "cutover_rollback")
    assert_clean_failure(proc, "would delete 11 of 23 legacy users", "--allow-mass-delete")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert deploy.one("SELECT COUNT(*) FROM account_user") == 23


def test_rollback_with_allow_mass_delete_deletes_them(deploy):
    deploy.cutover()
    deploy.python(NEW, DELETE_ELEVEN_NEW_USERS)
    out = deploy.rollback("--allow-mass-delete")
    assert "deleted 11" in out
    assert deploy.one("SELECT COUNT(*) FROM account_user") == 12


def test_rollback_carries_a_rename_and_a_signup_reusing_the_freed_username(deploy):
    alice = deploy.user_id("alice")
    deploy.cutover()
    deploy.python(NEW, "from account.models import NewUser; "
                       "NewUser.objects.filter(username='alice').update(username='alice_old')")  # fmt: skip
    signup = _new_signup(deploy, "alice")
    deploy.rollback()
    assert deploy.user_id("alice_old") == alice
    assert deploy.user_id("alice") == signup


def test_rollback_carries_two_users_swapping_usernames(deploy):
    alice, bob = deploy.user_id("alice"), deploy.user_id("bob")
    deploy.cutover()
    deploy.python(
        NEW,
        "from account.models import NewUser as U\n"
        "U.objects.filter(username='alice').update(username='tmp')\n"
        "U.objects.filter(username='bob').update(username='alice')\n"
        "U.objects.filter(username='tmp').update(username='bob')",
    )
    deploy.rollback()
    assert (deploy.user_id("bob"), deploy.user_id("alice")) == (alice, bob)


def test_rollback_dry_run_refuses_a_username_the_legacy_table_would_hold_twice(deploy):
    """bob renames himself and is left out (phone too long): he keeps 'bob' in the legacy
    table, so the signup who took 'bob' on the new side cannot be carried back."""
    deploy.cutover()
    deploy.sql("UPDATE account_newuser SET username = 'bob_old' WHERE username = 'bob'")
    _make_phone_too_long(deploy, "bob_old")
    _new_signup(deploy, "bob")
    proc = deploy.manage(OLD, "cutover_rollback", "--dry-run")
    assert_clean_failure(
        proc, "1 users the legacy table holds have new-side changes it cannot take",
        "phone_number_too_long: 1, username_taken: 1",
    )  # fmt: skip


def test_rollback_with_an_unwritable_report_dir_ends_in_one_line(deploy):
    deploy.cutover()
    _make_phone_too_long(deploy, "bob")
    (deploy.tmp_path / "a-file").write_text("")
    proc = deploy.manage(OLD, "cutover_rollback", REPORT_DIR=deploy.tmp_path / "a-file" / "r")
    assert_clean_failure(proc, "Cannot write the rollback's report in", "set REPORT_DIR")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert is_cut_over_in(deploy)


@postgresql_only
def test_rollback_restores_each_constraint_exactly(deploy):
    tables = ("django_admin_log", "shop_order", "shop_team_members")
    before = deploy.definitions(*tables)
    deploy.cutover()
    deploy.rollback()
    assert deploy.definitions(*tables) == before
