"""Fill the legacy user table with realistic fake users, fast."""

import time
from argparse import ArgumentTypeError

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.db.models import Max

from account.dbutil import analyze, insert_rows, is_postgresql, table_exists
from account.fakedata import COLUMNS, DEFAULT_PASSWORD, DEFECT_KINDS, FakeUsers
from account.management.base import OneLineErrorCommand
from account.models import User
from account.progress import progress


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n <= 0:
        raise ArgumentTypeError(f"expected a number greater than 0, got {n}")
    return n


def fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= f <= 1:
        raise ArgumentTypeError(f"must be between 0 and 1, got {f}")
    return f


def account_migrated() -> bool:
    """Whether any migration of the account app was applied (then never migrate from here)."""
    recorder = MigrationRecorder(connection)
    return recorder.has_table() and recorder.migration_qs.filter(app="account").exists()


class Command(OneLineErrorCommand):
    help = (
        "Add N fake users to the legacy account.User table: realistic names (Faker), unique "
        "usernames and emails, valid Nepali phone numbers and one shared, documented password. "
        "Each batch is committed on its own; an interrupted run keeps whole batches only."
    )

    def add_arguments(self, parser):
        parser.add_argument("count", type=positive_int, help="How many users to add (N > 0).")
        parser.add_argument(
            "--password",
            default=DEFAULT_PASSWORD,
            help=f"Password every fake user can log in with (default: {DEFAULT_PASSWORD!r}).",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="Seed for reproducible output (default: random)."
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=50_000,
            help="Users written and committed per batch (default: 50000).",
        )
        parser.add_argument(
            "--dirty",
            type=fraction,
            default=0.0,
            metavar="FRACTION",
            help="Fraction (0..1) of users given a defect real legacy tables have: duplicate or "
            "case-duplicate, empty, malformed or padded emails; garbage, foreign or oddly "
            "formatted phones. Default 0.",
        )

        parser.add_argument(
            "--migrate",
            action="store_true",
            help="On a database where the account app has no migration applied yet, first "
            "migrate it to the legacy schema (account 0001). Never migrates backwards.",
        )

    def handle(
        self, *args, count, password, seed, batch_size, dirty, migrate, verbosity, **options
    ):
        if migrate and not account_migrated():
            if verbosity > 0:
                self.stdout.write(
                    "Migrating the empty database to the legacy schema (account 0001)."
                )
            call_command("migrate", "account", "0001", verbosity=0)
        if not table_exists(User):
            raise CommandError(
                "The legacy table account_user does not exist: run "
                "`python manage.py migrate account 0001` (or `make populate`) first."
            )
        factory = FakeUsers(seed=seed, password=password, dirty=dirty)
        # Numbers in usernames and emails continue after the highest id, so re-runs never collide.
        first_number = (User.objects.aggregate(m=Max("id"))["m"] or 0) + 1
        written = 0
        started = time.perf_counter()
        bar = progress(count, "populate", verbosity=verbosity, unit="users")
        try:
            while written < count:
                size = min(batch_size, count - written)
                rows = factory.batch(first_number + written, size)
                with transaction.atomic():
                    insert_rows(User, COLUMNS, rows)
                written += size
                bar.update(size)
        except KeyboardInterrupt:
            raise CommandError(
                f"Interrupted: {written} users were committed in whole batches; "
                "the batch in progress was rolled back."
            ) from None
        except DatabaseError as exc:
            raise CommandError(
                f"A batch failed and was rolled back ({exc}); {written} users were committed before it."
            ) from None
        finally:
            bar.close()
        analyze([User])  # as pg_restore does: plans for the next queries need fresh statistics
        seconds = time.perf_counter() - started
        if verbosity > 0:
            if dirty:
                for kind in DEFECT_KINDS:
                    self.stdout.write(f"  dirty rows, {kind}: {factory.defects[kind]}")
            how = "COPY" if is_postgresql() else "bulk_create"
            self.stdout.write(
                self.style.SUCCESS(
                    f"Added {written} legacy users in {seconds:.1f} s "
                    f"({written / max(seconds, 1e-9):,.0f} users/s, {how}); "
                    f"password for all: {password!r}."
                )
            )
