"""Copy legacy users into NewUser + Profile: the re-sync behind `make migrate-data`."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from account.dbutil import table_exists
from account.models import NewUser, OperationLog, Profile, User
from account.progress import progress
from account.usercopy import CopyModels, copy_users


class Command(BaseCommand):
    help = (
        "Copy every legacy user not yet in NewUser (new since the last copy, or fixed after a "
        "rejection) into NewUser + Profile, in one transaction, verified field by field. "
        "Migration 0002 does the first copy; this command repeats it safely."
    )
    dry_run_default = False

    def add_arguments(self, parser):
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            default=settings.USER_COPY_SKIP_INVALID,
            help="Copy every valid row and leave the rejected ones in the legacy table, listed "
            "in the report. Default: one rejected row stops the copy and nothing is written "
            "(or USER_COPY_SKIP_INVALID from the environment).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=20_000,
            help="Legacy rows read and written per batch (default: 20000).",
        )
        if not self.dry_run_default:
            parser.add_argument(
                "--dry-run",
                action="store_true",
                help="Check every row and write the report, but write nothing to the database.",
            )

    def handle(self, *args, skip_invalid, batch_size, verbosity, **options):
        dry_run = options.get("dry_run", self.dry_run_default)
        if batch_size <= 0:
            raise CommandError("--batch-size must be greater than 0")
        if not table_exists(User) or not table_exists(NewUser):
            raise CommandError(
                "The account tables do not exist: run `python manage.py migrate` first."
            )
        bar = progress(None, "check" if dry_run else "copy", verbosity=verbosity, unit="users")

        def advance(n):
            bar.update(n)
            if verbosity >= 2:  # a line per batch, for logs and pipes where no bar is shown
                self.stdout.write(f"  {bar.n} of {bar.total} legacy users processed")
                self.stdout.flush()

        try:
            result = copy_users(
                CopyModels(legacy=User, new=NewUser, profile=Profile, log=OperationLog),
                skip_invalid=skip_invalid,
                dry_run=dry_run,
                batch_size=batch_size,
                report_dir=settings.REPORT_DIR,
                on_start=lambda total: setattr(bar, "total", total),
                on_progress=advance,
            )
        finally:
            bar.close()
        self.report(result, skip_invalid, verbosity)

    def report(self, result, skip_invalid, verbosity):
        if verbosity > 0:
            for line in result.lines():
                self.stdout.write(line)
        if not result.pending:
            self.stdout.write(
                self.style.SUCCESS("Nothing to copy: every legacy user is in NewUser.")
            )
        elif result.rejected_total and skip_invalid:
            self.stdout.write(
                self.style.WARNING(
                    f"Copied {result.copied}; {result.rejected_total} rejected rows stay in the "
                    f"legacy table, listed in {result.report}."
                )
            )
        elif not result.dry_run:
            self.stdout.write(self.style.SUCCESS(f"Copied {result.copied} users, verified."))
