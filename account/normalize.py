"""The rules that turn a legacy value into a new-schema value, one function per field.

Each `normalize_*` function returns `(value, change)` where `change` names the kind of
normalisation applied (None when the value was kept as it was), or raises `Rejected` with the
reason when the value cannot be kept. The copy and the pre-flight check use them.

The verification does not run these rules again: `email_matches` and `phone_matches` check a
stored value against its legacy value with a rule of their own, so a defect in a rule is caught
instead of repeated. Every comparison happens here, in Python: the database's LOWER() and TRIM()
disagree with Python's on non-ASCII text, so the copy only relies on them for ASCII (emails
outside ASCII are rejected).
"""

import re
import unicodedata

import phonenumbers
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX, get_hashers_by_algorithm
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

PHONE_REGION = "NP"
# Nepali mobile numbers as populate_fake_user_bulk writes them (980-982, 984-986 + 7 digits) are
# valid for phonenumbers; this fast path skips its parser for them (1 µs instead of 15 µs).
# ASCII digits only: `\d` would also match full-width and other Unicode digits.
# A test checks the fast path against phonenumbers.
_CLEAN_NP_MOBILE = re.compile(r"98[0-24-6][0-9]{7}")
# Emails of the shape populate writes: checked by Django's validator only when they do not match.
_PLAIN_EMAIL = re.compile(r"[a-z0-9]+(?:[._][a-z0-9]+)*@[a-z0-9]+(?:[.-][a-z0-9]+)*\.[a-z]{2,}")
# "9841234567 x12", "9841234567 ext. 12", "9841234567#12": an extension the new field would drop.
_EXTENSION = re.compile(r"(?:e?xt?\.?|extension|#)\s*[0-9]+\s*$", re.IGNORECASE | re.ASCII)
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_NP_PREFIX = "+977"  # Nepal's country code: what follows it is the national number
_NATIONAL_PREFIX = (
    phonenumbers.PhoneMetadata.metadata_for_region(PHONE_REGION).national_prefix or ""
)


class Rejected(ValueError):
    """A legacy value the new schema cannot take; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Email: trim spaces, lowercase the domain; ASCII only.


def normalize_email(email: str) -> tuple[str, str | None]:
    """Trim spaces and lowercase the domain (Django's rule); the local part keeps its case."""
    trimmed = email.strip(" ")
    if not trimmed:
        raise Rejected("email_empty", "email is empty")
    if not trimmed.isascii():
        raise Rejected(
            "email_non_ascii",
            f"{trimmed!r} has characters outside ASCII; write the domain in its ASCII (IDNA) form",
        )
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


def email_matches(legacy: str, stored: str) -> bool:
    """Verification: the local part exactly as it was, the domain lowercased, nothing else."""
    if not stored.isascii():
        return False
    old_local, at, old_domain = legacy.strip(" ").rpartition("@")
    new_local, _, new_domain = stored.rpartition("@")
    return bool(at) and new_local == old_local and new_domain == old_domain.lower()


# Phone: the digits the user typed, and only those, in E.164.


def _phone_digits(phone: str) -> tuple[str, bool]:
    """The ASCII digits of `phone` and whether it starts with '+'; spacing/punctuation dropped.

    Raises `Rejected` for letters, extensions and any other character.
    """
    if _EXTENSION.search(phone) and any(c.isdigit() for c in _EXTENSION.split(phone)[0]):
        raise Rejected("phone_extension", f"{phone!r} has an extension, which E.164 cannot hold")
    digits = []
    plus = False
    for ch in phone:
        category = unicodedata.category(ch)
        if category == "Nd":
            digits.append(str(unicodedata.decimal(ch)))
        elif ch == "+" and not digits and not plus:
            plus = True
        elif category[0] == "Z" or category in {"Pd", "Ps", "Pe"} or ch in "./":
            continue  # spaces of any kind, dashes, brackets, dots and slashes
        elif category[0] == "L":
            raise Rejected("phone_letters", f"{phone!r} has letters, not only digits")
        else:
            raise Rejected("phone_unparseable", f"{phone!r} is not a phone number")
    return "".join(digits), plus


def normalize_phone(phone: str) -> tuple[str, str | None]:
    """Parse with phonenumbers (default region NP) and store E.164; blank stays blank.

    Kept only when the E.164 number has exactly the digits typed (a national prefix such as
    Nepal's 0, or the international 00, may be dropped; nothing else).
    """
    if _CLEAN_NP_MOBILE.fullmatch(phone):
        return "+977" + phone, None
    digits, plus = _phone_digits(phone)
    if not digits:
        if plus:
            raise Rejected("phone_unparseable", f"{phone!r} is not a phone number")
        return "", ("phone_blank_cleared" if phone else None)
    try:
        parsed = phonenumbers.parse(("+" if plus else "") + digits, PHONE_REGION)
    except phonenumbers.NumberParseException:
        raise Rejected("phone_unparseable", f"{phone!r} is not a phone number") from None
    if not phonenumbers.is_valid_number(parsed):
        raise Rejected("phone_invalid", f"{phone!r} is not a valid number (region {PHONE_REGION})")
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not phone_matches(phone, e164):
        raise Rejected("phone_digits_changed", f"{phone!r} would be stored as other digits")
    if parsed.country_code != 977:
        return e164, "phone_foreign_kept"
    return e164, "phone_reformatted"


def phone_matches(legacy: str, stored: str) -> bool:
    """Verification: `stored` is E.164 and holds exactly the legacy value's digits.

    The legacy digits may carry the country code (after '+', or '00', or as they are), or be
    the national number with or without the national prefix (0 in Nepal).
    """
    if legacy.isascii() and legacy.isdigit():
        if stored == _NP_PREFIX + legacy and _E164.fullmatch(stored):
            return True  # the common case: a national number with the country code before it
        digits, plus = legacy, False  # without the per-character loop
    else:
        try:
            digits, plus = _phone_digits(legacy)
        except Rejected:
            return False
    if not digits:
        return stored == ""
    if not _E164.fullmatch(stored):
        return False
    full = stored[1:]
    if plus:
        return digits == full
    if stored.startswith(_NP_PREFIX):
        national = stored[len(_NP_PREFIX) :]
    else:
        national = phonenumbers.national_significant_number(phonenumbers.parse(stored))
    return digits in {full, "00" + full, national, _NATIONAL_PREFIX + national}


# Username: kept as it is.

_USERNAME = re.compile(UnicodeUsernameValidator.regex)


def check_username(username: str) -> None:
    """Usernames are copied as they are, so they must already pass the new model's validator."""
    if not username:
        raise Rejected("username_empty", "username is empty")
    if len(username) > 150:
        raise Rejected("username_too_long", f"username has {len(username)} characters (max 150)")
    if unicodedata.normalize("NFKC", username) != username:
        raise Rejected(
            "username_not_normalized",
            f"{username!r} changes under NFKC, as Django's login form folds it: the user "
            "could not log in",
        )
    if not _USERNAME.match(username):
        raise Rejected(
            "username_invalid", f"{username!r} has characters other than letters, digits and @.+-_"
        )


# Password: the hash copied verbatim; it must be one a configured hasher can verify.


def password_algorithm(encoded: str) -> str:
    """The algorithm of a stored hash, as Django's `identify_hasher` names it."""
    if not encoded:
        return "empty"
    if encoded.startswith(UNUSABLE_PASSWORD_PREFIX):
        return "unusable"
    if (len(encoded) == 32 and "$" not in encoded) or (
        len(encoded) == 37 and encoded.startswith("md5$$")
    ):
        return "unsalted_md5"
    if len(encoded) == 46 and encoded.startswith("sha1$$"):
        return "unsalted_sha1"
    return encoded.split("$", 1)[0]


def check_password_hash(encoded: str) -> str:
    """Return the hash's algorithm; reject it when no hasher in PASSWORD_HASHERS can verify it.

    Empty and unusable ('!...') passwords are kept as they are: nobody can log in with them,
    on either side.
    """
    algorithm = password_algorithm(encoded)
    if algorithm in {"empty", "unusable"}:
        return algorithm
    if hasher := get_hashers_by_algorithm().get(algorithm):
        try:
            hasher.decode(encoded)
        except Exception:  # noqa: BLE001 - each hasher fails its own way on a broken hash
            raise Rejected(
                "password_malformed", f"a {algorithm} password hash that cannot be read"
            ) from None
        return algorithm
    raise Rejected(
        "password_unknown_hasher",
        f"password hash of algorithm {algorithm!r}, which no hasher in PASSWORD_HASHERS "
        "verifies: add its hasher to PASSWORD_HASHERS in config/settings.py",
    )
