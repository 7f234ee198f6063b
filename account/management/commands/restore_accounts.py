"""Restore the account tables from a backup made by backup_accounts."""

from django.core.management.base import BaseCommand
from django.utils import timezone

from account.backup import restore
from account.models import OperationLog
from account.progress import progress


class Command(BaseCommand):
    help = (
        "Check a backup's manifest and checksum, then restore every table it holds in one "
        "transaction and reset the id sequences. Refuses a corrupted, truncated or foreign "
        "file, and tables that already hold rows unless --replace."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="The backup file (.jsonl or .jsonl.gz).")
        parser.add_argument(
            "--replace",
            action="store_true",
            help="Delete the rows the tables hold now, in the same transaction, before loading.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check the file and the database and show what would be restored; write nothing.",
        )

    def handle(self, *args, file, replace, dry_run, verbosity, **options):
        started_at = timezone.now()
        bar = progress(None, "restore", verbosity=verbosity if not dry_run else 0)
        try:
            outcome = restore(file, replace=replace, dry_run=dry_run, on_progress=bar.update)
        finally:
            bar.close()
        if dry_run:
            for table, n in outcome.rows.items():
                self.stdout.write(f"  {table}: {n} rows")
            self.stdout.write(
                self.style.SUCCESS(
                    f"Dry run: {file} is intact; {outcome.total} rows would be restored"
                    f"{' after deleting the current rows' if replace else ''}. Nothing was written."
                )
            )
            return
        outcome.log(OperationLog.Kind.RESTORE, started_at)
        if verbosity > 0:
            self.stdout.write(self.style.SUCCESS(outcome.line("Restored")))
