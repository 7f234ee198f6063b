"""The rules that turn a legacy value into a new-schema value, one function per field.

Each function returns `(value, change)` where `change` names the kind of normalisation
applied (None when the value was kept as it was), or raises `Rejected` with the reason when
the value cannot be kept. The copy, the pre-flight check and the verification all use these,
so there is one set of rules. The README lists them.
"""

import re

import phonenumbers
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

PHONE_REGION = "NP"
# Nepali mobile numbers as populate_fake_user_bulk writes them (980-982, 984-986 + 7 digits) are
# valid for phonenumbers; this fast path skips its parser for them (1 µs instead of 15 µs).
# A test checks the fast path against phonenumbers.
_CLEAN_NP_MOBILE = re.compile(r"98[0-24-6]\d{7}")
# Emails of the shape populate writes: checked by Django's validator only when they do not match.
_PLAIN_EMAIL = re.compile(r"[a-z0-9]+(?:[._][a-z0-9]+)*@[a-z0-9]+(?:[.-][a-z0-9]+)*\.[a-z]{2,}")


class Rejected(ValueError):
    """A legacy value the new schema cannot take; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalize_email(email: str) -> tuple[str, str | None]:
    """Trim spaces and lowercase the domain (Django's rule); the local part keeps its case."""
    trimmed = email.strip(" ")
    if not trimmed:
        raise Rejected("email_empty", "email is empty")
    if len(trimmed) > 254:
        raise Rejected("email_too_long", f"email has {len(trimmed)} characters (max 254)")
    if not _PLAIN_EMAIL.fullmatch(trimmed):
        try:
            validate_email(trimmed)
        except ValidationError:
            raise Rejected("email_invalid", f"{trimmed!r} is not a valid email address") from None
    local, _, domain = trimmed.rpartition("@")
    value = f"{local}@{domain.lower()}"
    if value == email:
        return value, None
    return value, "email_trimmed" if trimmed != email else "email_domain_lowercased"


def normalize_phone(phone: str) -> tuple[str, str | None]:
    """Parse with phonenumbers (default region NP) and store E.164; empty stays empty."""
    value = phone.strip()
    if not value:
        return "", None
    if _CLEAN_NP_MOBILE.fullmatch(value):
        return "+977" + value, None
    try:
        parsed = phonenumbers.parse(value, PHONE_REGION)
    except phonenumbers.NumberParseException:
        raise Rejected("phone_unparseable", f"{phone!r} is not a phone number") from None
    if not phonenumbers.is_valid_number(parsed):
        raise Rejected("phone_invalid", f"{phone!r} is not a valid number (region {PHONE_REGION})")
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if parsed.country_code != 977:
        return e164, "phone_foreign_kept"
    return e164, "phone_reformatted"


_USERNAME = re.compile(UnicodeUsernameValidator.regex)


def check_username(username: str) -> None:
    """Usernames are copied as they are, so they must already pass the new model's validator."""
    if not username:
        raise Rejected("username_empty", "username is empty")
    if len(username) > 150:
        raise Rejected("username_too_long", f"username has {len(username)} characters (max 150)")
    if not _USERNAME.match(username):
        raise Rejected(
            "username_invalid", f"{username!r} has characters other than letters, digits and @.+-_"
        )
