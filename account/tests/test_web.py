"""The pages: login with the old password, the account page, status (and its chart), health."""

import logging
import re
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from django.views.debug import technical_500_response

from account import views
from account.models import NewUser, OperationLog, User
from account.tests.test_cutover import postgresql_only, sqlite_only

SVG = "{http://www.w3.org/2000/svg}"

pytestmark = pytest.mark.django_db


@pytest.fixture
def migrated(run, dirty_legacy):
    run("copy_users", "--skip-invalid")
    return NewUser.objects.get(pk=dirty_legacy["clean"][4].pk)


def test_migrated_user_logs_in_with_the_old_password_and_sees_the_profile(client, migrated):
    response = client.post("/login/", {"username": migrated.username, "password": "old-secret"})
    assert response.status_code == 302 and response.url == "/account/me/"
    page = client.get("/account/me/").content.decode()
    assert migrated.full_name in page and migrated.email in page
    assert 'id="profile"' in page and "No profile" not in page


def test_wrong_password_is_refused(client, migrated):
    response = client.post("/login/", {"username": migrated.username, "password": "nope"})
    assert response.status_code == 200
    assert "didn't match" in response.content.decode()
    assert client.get("/account/me/").status_code == 302  # still anonymous


def test_login_is_protected_by_csrf(migrated):
    client = Client(enforce_csrf_checks=True)
    response = client.post("/login/", {"username": migrated.username, "password": "old-secret"})
    assert response.status_code == 403
    assert "csrfmiddlewaretoken" in client.get("/login/").content.decode()


def staff_client(client):
    staff = NewUser.objects.create_user(
        "staffer", "staffer@example.com", "pw", is_staff=True, id=9000
    )
    client.force_login(staff)
    return client


def copy_log(message, ok=True, **summary):
    return OperationLog.objects.create(
        kind="copy", ok=ok, started_at=timezone.now(), summary=summary, message=message
    )


def svg_chart(page: str) -> ElementTree.Element:
    match = re.search(r"<svg id=\"rejections-chart\".*?</svg>", page, re.DOTALL)
    assert match, "no chart on the page"
    return ElementTree.fromstring(match.group(0))


def bars(chart: ElementTree.Element) -> list[tuple[str, int, int]]:
    """(reason, count, bar width) for each bar, top to bottom."""
    return [
        (g.get("data-reason"), int(g.get("data-count")), int(g.find(f"{SVG}rect").get("width")))
        for g in chart.iter(f"{SVG}g")
    ]


@pytest.mark.parametrize("visitor", ["anonymous", "signed-in non-staff"])
def test_status_tells_visitors_who_are_not_staff_only_that_the_app_is_up(
    client, migrated, run, visitor
):
    run("backup_accounts")
    if visitor != "anonymous":
        client.force_login(migrated)
    page = client.get("/status/").content.decode()
    assert 'id="app-up"' in page
    logs = OperationLog.objects.all()
    assert logs.count() >= 2
    for log in logs:
        assert log.message not in page
        assert not log.summary.get("report") or log.summary["report"] not in page
    assert "legacy-count" not in page and "<svg" not in page and "rejected" not in page
    assert "change-log" not in page and "follower" not in page.lower()
    for username, email in User.objects.values_list("username", "email"):
        assert username not in page
        assert not email.strip() or email.strip() not in page


def test_status_shows_counts_messages_and_file_names_to_staff(client, migrated, run, settings):
    run("backup_accounts")
    page = staff_client(client).get("/status/").content.decode()
    assert f'id="legacy-count">{User.objects.count()}<' in page
    assert f'id="new-count">{NewUser.objects.count()}<' in page
    copy = OperationLog.objects.get(kind="copy")
    assert copy.message in page
    backup = OperationLog.objects.get(kind="backup")
    assert backup.message in page
    backup_file = next(Path(settings.BACKUP_DIR).glob("accounts-*")).name
    assert backup_file in page


def test_status_chart_has_one_bar_per_reason_of_the_last_copy(client, migrated):
    rejected = OperationLog.objects.get(kind="copy").summary["rejected_by_reason"]
    assert len(rejected) >= 3  # the fixture's defects are of several kinds
    page = staff_client(client).get("/status/").content.decode()
    shown = {reason: count for reason, count, _ in bars(svg_chart(page))}
    assert shown == rejected


def test_status_chart_bars_are_longest_first_and_scaled_to_the_largest(client):
    copy_log("copied 10", copied=10, rejected_by_reason={"phone_invalid": 2, "email_empty": 1,
                                                          "email_duplicate": 4, "id_taken": 0})  # fmt: skip
    page = staff_client(client).get("/status/").content.decode()
    widest = views.CHART_BAR_MAX_WIDTH
    assert bars(svg_chart(page)) == [
        ("email_duplicate", 4, widest),
        ("phone_invalid", 2, widest // 2),
        ("email_empty", 1, widest // 4),
    ]


def test_status_has_no_chart_when_nothing_was_rejected(client):
    copy_log("copied 10", copied=10, rejected=0, rejected_by_reason={})
    page = staff_client(client).get("/status/").content.decode()
    assert "copied 10" in page and "<svg" not in page


def test_status_shows_the_last_copy_that_did_something_not_a_later_no_op(client, migrated, run):
    first = OperationLog.objects.get(kind="copy")
    later = copy_log(
        "re-sync, nothing new",
        pending=first.summary["rejected"],
        copied=0,
        already_copied=first.summary["copied"],
        groups=0,
        permissions=0,
        rejected=first.summary["rejected"],
        rejected_by_reason=first.summary["rejected_by_reason"],
        normalised_by_kind={},
        seconds=0.2,
        report="user-copy-later.csv",
    )
    assert later.finished_at > first.finished_at
    page = staff_client(client).get("/status/").content.decode()
    assert first.message in page
    assert later.message not in page and "user-copy-later.csv" not in page


def test_status_says_so_when_every_copy_was_a_no_op(client):
    copy_log("re-sync, nothing new", pending=0, copied=0, rejected=0, seconds=0.1)
    page = staff_client(client).get("/status/").content.decode()
    assert "re-sync, nothing new" not in page
    assert "No copy has changed anything yet" in page


def cell(page: str, id: str) -> str | None:
    match = re.search(rf'<td id="{id}">(.*?)</td>', page, re.DOTALL)
    return match.group(1) if match else None


def changes(*rows):
    """Replace the change log by `rows`: (side, user id, op, seconds ago)."""
    from account.models import ChangeLog

    ChangeLog.objects.all().delete()
    now = timezone.now()
    for side, user_id, op, ago in rows:
        ChangeLog.objects.create(
            side=side, user_id=user_id, op=op, at=now - timezone.timedelta(seconds=ago)
        )


@postgresql_only
def test_status_shows_the_change_log_at_a_glance(client):
    from account import readonly

    staff = staff_client(client)
    changes(("legacy", 4, "update", 90), ("legacy", 4, "links", 30), ("legacy", 5, "insert", 1),
            ("legacy", 6, "pending", 500), ("legacy", 7, "pending", 400),
            ("legacy", 7, "pending", 300), ("new", 8, "update", 1))  # fmt: skip
    page = staff.get("/status/").content.decode()
    assert cell(page, "log-capture") == "on"
    assert cell(page, "log-depth") == "3"  # the rows waiting, not the rejected users kept
    assert 89 <= float(cell(page, "log-lag").removesuffix(" s")) <= 95  # the oldest waiting
    assert cell(page, "log-kept") == "2"  # users, not rows
    assert cell(page, "follower") == "not running"
    assert cell(page, "log-new-side") is None  # not cut over
    changes(("legacy", 6, "pending", 500), ("legacy", 0, "full", 2))
    page = staff.get("/status/").content.decode()
    assert cell(page, "log-depth") == "0 (and a request to compare every user at the next sync)"
    assert 1 <= float(cell(page, "log-lag").removesuffix(" s")) <= 8
    changes(("legacy", 6, "pending", 500))
    assert cell(staff.get("/status/").content.decode(), "log-lag") == "none waiting"

    with connection.cursor() as cursor:  # rolled back with the test's transaction
        cursor.execute("SAVEPOINT s")
        cursor.execute("ALTER TABLE account_changelog DISABLE TRIGGER account_changelog_notify")
    page = staff.get("/status/").content.decode()
    assert cell(page, "log-capture").startswith("on, but the NOTIFY trigger of the change log")
    with connection.cursor() as cursor:
        cursor.execute("ROLLBACK TO SAVEPOINT s")
        cursor.execute("ALTER EVENT TRIGGER account_capture_ddl DISABLE")
    page = staff.get("/status/").content.decode()
    assert cell(page, "log-capture").startswith("on, but the DDL watch is missing or disabled")
    assert cell(page, "log-depth") == "0"  # the row triggers still log: the depth means something
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE account_user DISABLE TRIGGER account_user_capture_update")
    page = staff.get("/status/").content.decode()
    assert cell(page, "log-capture").startswith("off: account_user_capture_update missing")
    assert cell(page, "log-depth") == "unknown" and cell(page, "log-lag") is None

    readonly.make_read_only(User, "default", "cut over")
    changes(("new", 8, "update", 1), ("new", 9, "insert", 1), ("new", 0, "full", 1))
    page = staff.get("/status/").content.decode()
    assert cell(page, "log-capture").startswith("suspended: cut over")
    assert cell(page, "log-new-side") == "2"  # users, not the DDL watch's 'full' row
    assert cell(page, "log-depth") is None


@sqlite_only
def test_status_says_there_is_no_change_log_on_sqlite(client):
    page = staff_client(client).get("/status/").content.decode()
    assert cell(page, "log-capture").startswith("none on SQLite")
    assert cell(page, "log-depth") is None and cell(page, "follower") == "not running"


def test_status_page_renders_when_the_change_log_cannot_be_read(client, monkeypatch, caplog):
    from django.db import DatabaseError

    def refuse(*args, **kwargs):
        raise DatabaseError("relation does not exist")

    monkeypatch.setattr(views, "log_state", refuse)
    page = staff_client(client).get("/status/").content.decode()
    assert cell(page, "log-capture") == "unknown: the database refused (DatabaseError)"
    assert cell(page, "log-depth") == "unknown"
    assert cell(page, "follower") == "unknown"


def at(days_ago):
    return timezone.now() - timezone.timedelta(days=days_ago)


def test_status_last_change_applied_skips_failed_and_no_op_copies(client):
    def logged(days_ago, message, ok=True, **summary):
        log = copy_log(message, ok=ok, **summary)
        OperationLog.objects.filter(pk=log.pk).update(finished_at=at(days_ago))

    logged(9, "copied", copied=3)
    logged(8, "a follower", follower="stopped", syncs=4, copied=2,
           applied_at=at(7).isoformat())  # fmt: skip
    logged(6, "refused", ok=False, copied=0)
    logged(5, "no-op", copied=0, pending=3, rejected=3)
    # A follower saved later (it refused) than its last change applied: that one counts.
    logged(1, "follower refusing", ok=False, follower="running", syncs=9, copied=0,
           applied_at=at(4).isoformat())  # fmt: skip
    newest = views.last_change_applied()
    assert abs((newest - at(4)).total_seconds()) < 60
    page = staff_client(client).get("/status/").content.decode()
    assert cell(page, "last-applied") not in (None, "none yet")
    OperationLog.objects.filter(message="follower refusing").delete()
    assert abs((views.last_change_applied() - at(7)).total_seconds()) < 60
    # A follower saved last whose change applied is older than a copy's that finished before.
    logged(0.5, "old follower stopping", follower="stopped", syncs=1, copied=1,
           applied_at=at(20).isoformat())  # fmt: skip
    assert abs((views.last_change_applied() - at(7)).total_seconds()) < 60


@postgresql_only
def test_status_says_a_follower_row_still_running_is_not_when_no_follower_holds_the_lock(client):
    copy_log("Follower running: 2 syncs", follower="running", syncs=2, updated=2)
    page = staff_client(client).get("/status/").content.decode()
    assert "no longer holds its lock: it is not running" in page
    assert cell(page, "follower") == "not running"


def test_status_last_change_applied_says_none_yet(client):
    copy_log("no-op", copied=0, pending=0)
    assert views.last_change_applied() is None
    assert cell(staff_client(client).get("/status/").content.decode(), "last-applied") == "none yet"


@postgresql_only
def test_status_says_whether_a_follower_is_running():
    """Only the follower's own lock counts: in this database, the one-bigint key."""
    import psycopg

    from account.follower import FOLLOW_KEY

    client = staff_client(Client())
    db = connection.settings_dict
    dsn = dict(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"])
    with (
        psycopg.connect(**dsn, dbname="postgres", autocommit=True) as other_db,
        psycopg.connect(**dsn, dbname=db["NAME"], autocommit=True) as same_db,
    ):
        other_db.execute("SELECT pg_advisory_lock(%s)", [FOLLOW_KEY])
        same_db.execute("SELECT pg_advisory_lock(0, %s)", [FOLLOW_KEY])  # two-int key: objsubid 2
        assert cell(client.get("/status/").content.decode(), "follower") == "not running"
        same_db.execute("SELECT pg_advisory_lock(%s)", [FOLLOW_KEY])
        pid = same_db.info.backend_pid
        page = client.get("/status/").content.decode()
        assert cell(page, "follower").startswith(
            f"running (database backend pid {pid}, its backend idle for"
        )
        with connection.cursor() as cursor:  # migrated back: no change log (rolled back)
            cursor.execute("ALTER TABLE account_changelog RENAME TO account_changelog_gone")
        page = client.get("/status/").content.decode()
        assert cell(page, "log-capture").startswith("not installed yet")
        assert cell(page, "follower").startswith(f"running (database backend pid {pid}")
        same_db.execute("SELECT pg_advisory_unlock_all()")
        assert cell(client.get("/status/").content.decode(), "follower") == "not running"


@pytest.mark.parametrize(
    "ok, summary, expected",
    [
        (True, {"copied": 3, "pending": 3}, True),
        (True, {"copied": 0, "groups": 2}, True),
        (True, {"copied": 0, "normalised_by_kind": {"email_trimmed": 1}}, True),
        (True, {"copied": 0, "updated": 1}, True),  # keys the engine may add later count too
        (True, {"copied": 0, "deleted": 1}, True),
        (True, {"copied": 0, "conflicts": 2, "legacy_total": 9}, False),  # nothing written
        (False, {"copied": 0, "pending": 5}, True),  # a failure is always worth showing
        (
            True,
            {
                "copied": 0,
                "pending": 5,
                "already_copied": 9,
                "rejected": 5,
                "rejected_by_reason": {"email_empty": 5},
                "normalised_by_kind": {},
                "seconds": 1.5,
                "report": "user-copy-x.csv",
            },
            False,
        ),  # fmt: skip
        (True, {}, False),
        # A follower's run: its syncs and refusals are no changes by themselves.
        (True, {"follower": "running", "syncs": 4, "refused": 2, "copied": 0}, False),
        (True, {"follower": "stopped", "syncs": 4, "refused": 0, "updated": 3}, True),
    ],
)
def test_a_copy_did_something_when_it_failed_or_changed_a_row(ok, summary, expected):
    log = OperationLog(kind="copy", ok=ok, started_at=timezone.now(), summary=summary)
    assert views.did_something(log) is expected


def test_health_answers_200_when_the_database_answers(client):
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


@pytest.mark.django_db(transaction=True)
def test_health_answers_503_with_a_fixed_message_and_logs_the_cause(client, caplog):
    broken = (
        {"HOST": "127.0.0.1", "PORT": "1"}  # nothing listens on port 1
        if connection.vendor == "postgresql"
        else {"NAME": "/nonexistent-directory/db.sqlite3"}
    )
    connection.close()
    saved = dict(connection.settings_dict)
    connection.settings_dict.update(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="account.views"):
            response = client.get("/health/")
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
    assert response.status_code == 503
    assert response.json() == {"status": "error", "database": "unavailable"}
    [record] = [r for r in caplog.records if r.name == "account.views"]
    cause = str(record.exc_info[1])
    assert ("port 1" if connection.vendor == "postgresql" else "unable to open") in cause
    assert cause not in response.content.decode()


def test_home_sends_visitors_to_login(client):
    assert client.get("/").url == "/login/"


def _error_page(request):
    """Django's DEBUG page for an error raised here (only this frame is in its traceback)."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        return technical_500_response(request, *sys.exc_info()).content.decode()


def test_the_debug_error_page_hides_the_database_url(rf, settings):
    # `make run` serves with DEBUG on; under runserver request.META holds the environment.
    settings.DEBUG = True
    settings.DATABASE_URL = "postgres://app:s3cret@db:5432/accounts"
    page = _error_page(rf.get("/", DATABASE_URL="postgres://app:s3cret@db:5432/accounts"))
    assert "boom" in page and page.count("DATABASE_URL") == 2  # the setting and the META key
    assert "s3cret" not in page
