"""Fake legacy users, fast: Faker's name lists, structural uniqueness, one password hash.

Faker's per-call API costs 2–70 µs a call and its `unique` proxy gives up near a million
values, so this module takes Faker's own name and domain lists once and combines them with
`random`: realistic names, and a running number in every username and email makes them
unique by construction. The password is hashed once and the encoded string reused.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from operator import itemgetter

from django.contrib.auth.hashers import make_password
from faker.providers.internet import Provider as InternetProvider
from faker.providers.person.en_IN import Provider as PersonProvider

DEFAULT_PASSWORD = "legacy-password"

# Columns written, in this order (the id is left to the database).
COLUMNS = (
    "password",
    "is_superuser",
    "username",
    "email",
    "full_name",
    "date_of_birth",
    "phone_number",
    "is_active",
    "is_staff",
)

# Drawn independently per user: 97% active; 1% staff (support desk, moderators), of whom
# 97% can sign in too, so a demo of a couple of thousand users always has staff to sign in with.
ACTIVE_SHARE = 0.97
STAFF_SHARE = 0.01

# Nepal's mobile prefixes (NTC 984-986, Ncell 980-982): 10 digits, valid for phonenumbers.
NP_MOBILE_PREFIXES = ("980", "981", "982", "984", "985", "986")

# Defects real legacy tables have, each a kind `--dirty` spreads its rows over.
DEFECT_KINDS = (
    "email_duplicate",
    "email_case_duplicate",
    "email_empty",
    "email_malformed",
    "email_whitespace",
    "phone_garbage",
    "phone_foreign",
    "phone_formatted",
)
_GARBAGE_PHONES = ("n/a", "none", "call me", "12345", "98XXXXXXXX", "-")
# Valid numbers of other countries, in the E.164 form that fits the 15-character column,
# and an Indian mobile written without its country code (not a valid Nepali number).
_FOREIGN_PHONES = ("+12015550123", "+447400123456", "+61412345678", "9123456789")


def _ascii_names(names) -> list[str]:
    return sorted({n for n in names if re.fullmatch(r"[A-Za-z]+", n)})


@dataclass
class FakeUsers:
    """Generates batches of legacy user rows; the same seed gives the same rows."""

    seed: int | None = None
    password: str = DEFAULT_PASSWORD
    dirty: float = 0.0
    today: date = field(default_factory=date.today)
    defects: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        salt = f"populate{self.seed}" if self.seed is not None else None
        self.password_hash = make_password(self.password, salt=salt)
        self.first_names = _ascii_names(
            (*PersonProvider.first_names_male, *PersonProvider.first_names_female)
        )
        self.last_names = _ascii_names(PersonProvider.last_names)
        self.domains = sorted({*InternetProvider.free_email_domains, "outlook.com", "yahoo.co.in"})
        # Every date of birth between 18 and 90 years ago.
        self.birth_dates = [self.today - timedelta(days=d) for d in range(18 * 366, 90 * 365)]

    def batch(self, first_number: int, size: int) -> list[tuple]:
        """`size` rows numbered from `first_number`; the number makes username and email unique."""
        rng = self.rng
        firsts = rng.choices(self.first_names, k=size)
        lasts = rng.choices(self.last_names, k=size)
        domains = rng.choices(self.domains, k=size)
        births = rng.choices(self.birth_dates, k=size)
        prefixes = rng.choices(NP_MOBILE_PREFIXES, k=size)
        phones = rng.choices(range(10_000_000), k=size)
        # Two draws: whether a user is active says nothing about whether they are staff.
        actives = [rng.random() < ACTIVE_SHARE for _ in range(size)]
        staffs = [rng.random() < STAFF_SHARE for _ in range(size)]
        pw = self.password_hash
        rows = []
        for i, first, last, domain, born, prefix, phone, active, staff in zip(
            range(first_number, first_number + size),
            firsts,
            lasts,
            domains,
            births,
            prefixes,
            phones,
            actives,
            staffs,
            strict=True,
        ):
            handle = f"{first.lower()}.{last.lower()}{i}"
            rows.append(
                [
                    pw,
                    False,
                    handle,
                    f"{handle}@{domain}",
                    f"{first} {last}",
                    born,
                    f"{prefix}{phone:07d}",
                    active,
                    staff,
                ]
            )
        if self.dirty:
            self._add_defects(rows)
        # In username order, the database updates the username indexes page by page instead of
        # at random: about twice as fast. (Ids then follow the names, which changes nothing.)
        rows.sort(key=itemgetter(2))
        return [tuple(row) for row in rows]

    def _add_defects(self, rows: list[list]) -> None:
        rng = self.rng
        n_dirty = sum(rng.random() < self.dirty for _ in rows)
        dirty_idx = rng.sample(range(len(rows)), n_dirty)
        clean_idx = sorted(set(range(len(rows))) - set(dirty_idx)) or [0]
        emails = [row[3] for row in rows]
        for n, i in enumerate(dirty_idx):
            kind = DEFECT_KINDS[(n + rng.randrange(len(DEFECT_KINDS))) % len(DEFECT_KINDS)]
            row = rows[i]
            other = emails[rng.choice(clean_idx)]
            if kind == "email_duplicate":
                row[3] = other
            elif kind == "email_case_duplicate":
                local, _, domain = other.partition("@")
                row[3] = f"{local.capitalize()}@{domain.upper()}"
            elif kind == "email_empty":
                row[3] = ""
            elif kind == "email_malformed":
                row[3] = rng.choice((row[3].replace("@", ".at."), row[3].split("@")[0] + "@"))
            elif kind == "email_whitespace":
                row[3] = f"  {row[3]} "
            elif kind == "phone_garbage":
                row[6] = rng.choice(_GARBAGE_PHONES)
            elif kind == "phone_foreign":
                row[6] = rng.choice(_FOREIGN_PHONES)
            else:  # phone_formatted
                p = row[6]
                row[6] = rng.choice(
                    (f"{p[:3]}-{p[3:6]}-{p[6:]}", f"{p[:3]} {p[3:6]} {p[6:]}", f"0{p}", f"+977{p}")
                )
            self.defects[kind] += 1
