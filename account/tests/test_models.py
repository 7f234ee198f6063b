"""The new schema's rules live in the database."""

import pytest
from django.db import IntegrityError, transaction

from account.models import NewUser, Profile

pytestmark = pytest.mark.django_db


def test_emails_differing_only_in_case_cannot_both_exist():
    NewUser.objects.create_user("first", "Person@Example.com", "pw")
    with pytest.raises(IntegrityError), transaction.atomic():
        NewUser.objects.create(username="second", email="person@example.com")
    assert NewUser.objects.count() == 1


def test_usernames_are_unique():
    NewUser.objects.create_user("same", "a@example.com", "pw")
    with pytest.raises(IntegrityError), transaction.atomic():
        NewUser.objects.create(username="same", email="b@example.com")


def test_one_profile_per_user():
    user = NewUser.objects.create_user("p", "p@example.com", "pw")
    Profile.objects.create(user=user)
    with pytest.raises(IntegrityError), transaction.atomic():
        Profile.objects.create(user=user)


def test_phone_is_stored_as_e164_and_manager_normalises_email_domain():
    user = NewUser.objects.create_user(
        "nep", "Someone@EXAMPLE.com", "pw", phone_number="9841234567"
    )
    user.refresh_from_db()
    assert str(user.phone_number) == "+9779841234567"
    assert user.email == "Someone@example.com"
    assert user.check_password("pw")


def test_create_superuser_sets_flags():
    admin = NewUser.objects.create_superuser("root", "root@example.com", "pw")
    assert admin.is_staff and admin.is_superuser


@pytest.mark.parametrize(
    "url",
    [
        "/admin/account/newuser/",
        "/admin/account/newuser/add/",
        "/admin/account/user/",
        "/admin/account/profile/",
        "/admin/account/address/",
        "/admin/account/activity/",
        "/admin/account/notification/",
        "/admin/account/operationlog/",
    ],
)
def test_admin_pages_open(admin_client, url):
    assert admin_client.get(url).status_code == 200


def test_legacy_users_are_read_only_in_the_admin(admin_client):
    from .conftest import make_legacy

    legacy = make_legacy("old", "old@example.com")
    assert admin_client.get("/admin/account/user/add/").status_code == 403
    response = admin_client.post(
        f"/admin/account/user/{legacy.pk}/change/", {"username": "changed"}
    )
    assert response.status_code == 403
    legacy.refresh_from_db()
    assert legacy.username == "old"


def test_newuser_admin_change_page_shows_profile_and_addresses(admin_client):
    user = NewUser.objects.create_user("u", "u@example.com", "pw")
    page = admin_client.get(f"/admin/account/newuser/{user.pk}/change/").content.decode()
    assert "profile-0-bio" in page or "id_profile-0-bio" in page
    assert "addresses-TOTAL_FORMS" in page
