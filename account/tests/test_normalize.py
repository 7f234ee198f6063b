"""The per-field rules, and their fast paths agreeing with the full libraries."""

import random

import phonenumbers
import pytest
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from account.fakedata import NP_MOBILE_PREFIXES, FakeUsers
from account.normalize import (
    _CLEAN_NP_MOBILE,
    _PLAIN_EMAIL,
    Rejected,
    check_username,
    email_matches,
    normalize_email,
    normalize_phone,
    phone_matches,
)


@pytest.mark.parametrize(
    "raw, expected, change",
    [
        ("a@b.com", "a@b.com", None),
        ("  A.b@GMAIL.com ", "A.b@gmail.com", "email_trimmed"),
        ("Name@Example.ORG", "Name@example.org", "email_domain_lowercased"),
    ],
)
def test_emails_are_trimmed_and_their_domain_lowercased(raw, expected, change):
    assert normalize_email(raw) == (expected, change)


@pytest.mark.parametrize(
    "raw, reason",
    [("", "email_empty"), ("   ", "email_empty"), ("not-an-email", "email_invalid"),
     ("name@", "email_invalid"), ("a b@c.com", "email_invalid"),
     ("x" * 250 + "@b.com", "email_too_long")],
)  # fmt: skip
def test_bad_emails_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(Rejected) as info:
        normalize_email(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "raw, expected, change",
    [
        ("9841234567", "+9779841234567", None),
        ("984-123-4567", "+9779841234567", "phone_reformatted"),
        ("984 123 4567", "+9779841234567", "phone_reformatted"),
        ("09841234567", "+9779841234567", "phone_reformatted"),
        ("+9779841234567", "+9779841234567", "phone_reformatted"),
        ("+12015550123", "+12015550123", "phone_foreign_kept"),
        ("", "", None),
    ],
)
def test_phones_become_e164(raw, expected, change):
    assert normalize_phone(raw) == (expected, change)


@pytest.mark.parametrize(
    "raw, reason",
    [("call me", "phone_letters"), ("12345", "phone_invalid"), ("9123456789", "phone_invalid")],
)
def test_bad_phones_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(Rejected) as info:
        normalize_phone(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize("raw, reason", [("", "username_empty"), ("has space", "username_invalid"),
                                         ("x" * 151, "username_too_long")])  # fmt: skip
def test_bad_usernames_are_rejected(raw, reason):
    with pytest.raises(Rejected) as info:
        check_username(raw)
    assert info.value.reason == reason


NP_PREFIX_INTS = {int(p) for p in NP_MOBILE_PREFIXES}


def test_phone_fast_path_agrees_with_phonenumbers():
    rng = random.Random(0)
    for prefix in range(9700, 9900):
        number = f"{prefix}{rng.randrange(1_000_000):06d}"
        fast = bool(_CLEAN_NP_MOBILE.fullmatch(number))
        if fast or prefix // 10 in NP_PREFIX_INTS:
            assert fast and phonenumbers.is_valid_number(phonenumbers.parse(number, "NP")), number


def test_email_fast_path_accepts_only_what_django_accepts():
    emails = [row[3] for row in FakeUsers(seed=1).batch(1, 2000)]
    emails += ["a.b@c.de", "a..b@c.de", "a@b.c", "a@-b.com", "a_b@c-d.co"]
    for email in emails:
        if _PLAIN_EMAIL.fullmatch(email):
            try:
                validate_email(email)
            except ValidationError:
                pytest.fail(f"fast path accepted {email!r}, which Django rejects")


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("9841234567x12", "phone_extension"),
        ("9841234567 ext. 12", "phone_extension"),
        ("984-123-4567#3", "phone_extension"),
        ("984CALLNOW", "phone_letters"),
        ("call me", "phone_letters"),
        ("984123456*", "phone_unparseable"),
        ("+", "phone_unparseable"),
    ],
)
def test_phone_extensions_letters_and_symbols_are_rejected_each_with_its_reason(raw, reason):
    with pytest.raises(Rejected) as info:
        normalize_phone(raw)
    assert info.value.reason == reason


def test_full_width_digits_are_stored_as_ascii_e164_and_counted_as_reformatted():
    assert normalize_phone("９８４１２３４５６７") == ("+9779841234567", "phone_reformatted")


@pytest.mark.parametrize("raw", ["\u00a0", " ", "\u2003-\u00a0", "()"])
def test_a_phone_of_spaces_or_punctuation_only_is_cleared_and_counted(raw):
    assert normalize_phone(raw) == ("", "phone_blank_cleared")


@pytest.mark.parametrize(
    "legacy, stored, ok",
    [
        ("9841234567", "+9779841234567", True),
        ("09841234567", "+9779841234567", True),
        ("+977 984-123-4567", "+9779841234567", True),
        ("９８４１２３４５６７", "+9779841234567", True),
        ("9841234567", "+9779841234568", False),  # another digit
        ("9841234567x12", "+9779841234567", False),  # the extension is lost
        ("984CALLNOW", "+9779842255669", False),  # letters turned into digits
        ("９８４１２３４５６７", "+977９８４１２３４５６７", False),  # not E.164
        ("\u00a0", "", True),
        ("", "", True),
        ("9841234567", "", False),
    ],
)
def test_phone_verification_accepts_only_the_same_digits_in_e164(legacy, stored, ok):
    assert phone_matches(legacy, stored) is ok


@pytest.mark.parametrize(
    "raw, reason",
    [("user@İstanbul.com", "email_non_ascii"), ("üser@example.com", "email_non_ascii"),
     ("a\u00a0b@example.com", "email_non_ascii"), ("a\tb@example.com", "email_invalid")],
)  # fmt: skip
def test_emails_outside_ascii_are_rejected_so_python_and_sql_agree(raw, reason):
    with pytest.raises(Rejected) as info:
        normalize_email(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "legacy, stored, ok",
    [
        ("Name@Example.COM", "Name@example.com", True),
        (" Name@Example.COM ", "Name@example.com", True),
        ("Name@Example.COM", "name@example.com", False),  # the local part lowercased
        ("Name@Example.COM", "NAME@example.com", False),
        ("Name@Example.COM", "Name@Example.COM", False),  # the domain not lowercased
        ("Name@Example.COM", "Other@example.com", False),
    ],
)
def test_email_verification_compares_the_exact_value(legacy, stored, ok):
    assert email_matches(legacy, stored) is ok


def test_a_username_login_would_fold_is_rejected():
    with pytest.raises(Rejected) as info:
        check_username("ｂｏｂ")
    assert info.value.reason == "username_not_normalized"
