"""Back up every account table to a timestamped JSON Lines file."""

from django.conf import settings
from django.core.management.base import CommandError
from django.utils import timezone

from account.backup import BackupError, Progress, backup
from account.management.base import OneLineErrorCommand
from account.models import OperationLog


class Command(OneLineErrorCommand):
    script = "scripts/backup.py"
    help = (
        "Write the legacy users, new users, profiles, addresses, activities, notifications, "
        "the admin log, groups and their links to a new JSON Lines backup (gzip by default) "
        "with a manifest and a SHA-256 checksum; permissions, content types and groups by "
        "natural key. Never overwrites; file mode 0600 (it holds password hashes)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dir",
            default=None,
            help=f"Directory for the backup (default: BACKUP_DIR, now {settings.BACKUP_DIR}).",
        )
        parser.add_argument(
            "--output", default=None, help="Exact file name instead of a timestamped one."
        )
        parser.add_argument(
            "--no-gzip", action="store_true", help="Write plain .jsonl instead of .jsonl.gz."
        )

    def handle(self, *args, dir, output, no_gzip, verbosity, **options):
        started_at = timezone.now()
        progress = Progress("backup", verbosity=verbosity, stdout=self.stdout)
        try:
            outcome = backup(
                directory=dir or settings.BACKUP_DIR,
                output=output,
                compress=not no_gzip,
                progress=progress,
            )
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            progress.close()
        outcome.log(OperationLog.Kind.BACKUP, started_at)
        if verbosity > 0:
            self.stdout.write(self.style.SUCCESS(outcome.line("Backed up")))
