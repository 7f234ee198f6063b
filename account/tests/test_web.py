"""The pages: login with the old password, the account page, status, health, CSRF."""

import pytest
from django.db import connection
from django.db.utils import OperationalError
from django.test import Client

from account.models import NewUser, OperationLog

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


def test_status_shows_no_personal_data_or_counts_to_anonymous_visitors(client, migrated):
    page = client.get("/status/").content.decode()
    assert "Log in as staff to see user counts" in page
    assert "legacy-count" not in page
    for user in NewUser.objects.all():
        assert user.username not in page and user.email not in page
    assert "rejected: email_duplicate" in page  # counts by reason, no names


def test_status_shows_counts_and_last_runs_to_staff(client, migrated, run):
    run("backup_accounts")
    staff = NewUser.objects.create_user(
        "staffer", "staffer@example.com", "pw", is_staff=True, id=9000
    )
    client.force_login(staff)
    page = client.get("/status/").content.decode()
    assert f'id="legacy-count">{47}<' in page
    assert f'id="new-count">{NewUser.objects.count()}<' in page
    backup = OperationLog.objects.get(kind="backup")
    assert backup.message in page


def test_health_checks_the_database(client, monkeypatch):
    assert client.get("/health/").json() == {"status": "ok", "database": "ok"}

    def broken(*args, **kwargs):
        raise OperationalError("connection refused\nmore detail")

    monkeypatch.setattr(connection, "cursor", broken)
    response = client.get("/health/")
    assert response.status_code == 503
    assert response.json() == {"status": "error", "database": "connection refused"}


def test_home_sends_visitors_to_login(client):
    assert client.get("/").url == "/login/"
