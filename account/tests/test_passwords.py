"""Every hash format a legacy Django project may hold logs in after the copy, under the
production hasher list (not the tests' fast one), and a login upgrades the weak ones."""

import hashlib
from pathlib import Path

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.hashers import make_password
from django.core.management.base import CommandError

from account.models import NewUser

from .conftest import make_legacy

pytestmark = pytest.mark.django_db

PASSWORD = "s3cret-legacy"


def production_hashers():
    from config import settings as production

    return production.PASSWORD_HASHERS


def real_hashes() -> dict[str, str]:
    """A real hash of PASSWORD in each format, made by the hashers themselves."""
    return {
        "pbkdf2_sha256": make_password(PASSWORD, hasher="pbkdf2_sha256"),
        "pbkdf2_sha1": make_password(PASSWORD, hasher="pbkdf2_sha1"),
        "argon2": make_password(PASSWORD, hasher="argon2"),
        "bcrypt_sha256": make_password(PASSWORD, hasher="bcrypt_sha256"),
        "bcrypt": make_password(PASSWORD, hasher="bcrypt"),
        "scrypt": make_password(PASSWORD, hasher="scrypt"),
        "md5": make_password(PASSWORD, hasher="md5"),
        "sha1": make_password(PASSWORD, hasher="sha1"),
        # Written by hand, as Django 0.9x/1.0 stored them (no hasher class makes them any more).
        "unsalted_md5": hashlib.md5(PASSWORD.encode()).hexdigest(),
        "unsalted_md5 md5$$": "md5$$" + hashlib.md5(PASSWORD.encode()).hexdigest(),
        "unsalted_sha1": "sha1$$" + hashlib.sha1(PASSWORD.encode()).hexdigest(),
    }


@pytest.fixture
def production(settings):
    settings.PASSWORD_HASHERS = production_hashers()


def test_every_legacy_hash_format_logs_in_under_production_settings(run, production):
    hashes = real_hashes()
    users = {
        name: make_legacy(f"user{i}", f"user{i}@example.com", password=encoded)
        for i, (name, encoded) in enumerate(hashes.items())
    }
    out, _ = run("copy_users")
    assert "password hashes:" in out
    for name, legacy in users.items():
        user = authenticate(username=legacy.username, password=PASSWORD)
        assert user is not None and user.pk == legacy.pk, name
        assert authenticate(username=legacy.username, password="wrong") is None, name
    # Weak hashes were upgraded to the first hasher at login.
    for name in ("md5", "sha1", "unsalted_md5", "unsalted_sha1"):
        assert NewUser.objects.get(pk=users[name].pk).password.startswith("pbkdf2_sha256$"), name


def test_strong_hashers_come_before_the_legacy_ones():
    hashers = production_hashers()
    legacy = [
        h for h in hashers if h.startswith("account.hashers.") or h.endswith(".MD5PasswordHasher")
    ]
    assert hashers[0].endswith("PBKDF2PasswordHasher")
    assert hashers.index(legacy[0]) > hashers.index(
        "django.contrib.auth.hashers.ScryptPasswordHasher"
    )


def test_the_preflight_counts_users_per_hash_algorithm(run, production):
    make_legacy("a", "a@example.com", password=make_password(PASSWORD, hasher="md5"))
    make_legacy("b", "b@example.com", password=make_password(PASSWORD, hasher="md5"))
    make_legacy("c", "c@example.com", password="!unusable")
    out, _ = run("check_user_migration")
    assert "password hashes: md5 2, unusable 1" in out


def test_an_unknown_hasher_is_rejected_naming_the_algorithm_and_the_setting(run, production):
    user = make_legacy("a", "a@example.com", password="crypt$$abcdefghijk")
    with pytest.raises(CommandError, match="password_unknown_hasher: 1") as info:
        run("check_user_migration")
    path = str(info.value).split("See ", 1)[1].split(".csv", 1)[0] + ".csv"
    text = Path(path).read_text()
    assert "'crypt'" in text and "PASSWORD_HASHERS" in text and str(user.pk) in text


def test_an_unusable_password_is_kept_as_it_is(run, production):
    user = make_legacy("a", "a@example.com", password="!XyZunusable")
    run("copy_users")
    new = NewUser.objects.get(pk=user.pk)
    assert new.password == "!XyZunusable" and not new.has_usable_password()


def test_a_malformed_hash_of_a_known_algorithm_is_rejected(run, production):
    make_legacy("a", "a@example.com", password="pbkdf2_sha256$oops")
    with pytest.raises(CommandError, match="password_malformed: 1"):
        run("check_user_migration")
