"""Restore the account tables from a backup made by backup_accounts."""

from django.contrib.auth.models import Group
from django.core.management.base import CommandError
from django.utils import timezone

from account.backup import BackupError, Progress, plan_restore, restore
from account.management.base import OneLineErrorCommand
from account.models import OperationLog


class Command(OneLineErrorCommand):
    script = "scripts/restore.py"
    help = (
        "Check a backup's manifest, checksum and HMAC (keyed with BACKUP_KEY, or SECRET_KEY "
        "when unset) and this database, then restore every table it holds in one transaction "
        "and reset the id sequences. Permissions, content types and groups are matched by "
        "natural key. Refuses a corrupted, truncated, foreign or malformed file, a file whose "
        "HMAC does not match (made with another key, or changed since) or that has none (unless "
        "--accept-unkeyed), a permission this database lacks, tables that already hold rows unless "
        "--replace, other tables pointing at the rows it would delete, and a database role "
        "without the rights a restore needs."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="The backup file (.jsonl or .jsonl.gz).")
        parser.add_argument(
            "--replace",
            action="store_true",
            help="Delete the rows the tables hold now, in the same transaction, before loading "
            "(groups are matched by name and keep their ids). The whole admin log is replaced: "
            "entries made after the backup are lost, those about other apps' objects too.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check the file (every row) and this database and report what a restore would "
            "do, and every reason it would refuse; write nothing. Exits 0 when a restore would "
            "go ahead, 1 when it would refuse or the file is damaged (the reason on stderr, "
            "also at -v 0).",
        )
        parser.add_argument(
            "--accept-unkeyed",
            action="store_true",
            help="Also read a backup of an old, unkeyed format (version 2 or 3, without an HMAC). "
            "Its integrity cannot be proven: anyone could have changed it (given a user "
            "superuser rights, say) and recomputed its checksums. Use it only for a file you "
            "trust. A file whose HMAC does not match is refused all the same.",
        )

    def handle(self, *args, file, replace, dry_run, accept_unkeyed, verbosity, **options):
        try:
            if dry_run:
                plan = plan_restore(
                    file, replace=replace, read_rows=True, accept_unkeyed=accept_unkeyed
                )
                self.warn(plan.warnings)
                self.report(plan, verbosity)
                if plan.problems:
                    raise BackupError(f"Dry run: a restore would refuse: {plan.problems[0]}")
                return
            started_at = timezone.now()
            progress = Progress("restore", verbosity=verbosity, stdout=self.stdout)
            try:
                outcome = restore(
                    file, replace=replace, progress=progress, accept_unkeyed=accept_unkeyed
                )
            finally:
                progress.close()
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        outcome.log(OperationLog.Kind.RESTORE, started_at)
        if verbosity > 0:
            self.stdout.write(self.style.SUCCESS(outcome.line("Restored")))
        self.warn(outcome.warnings)

    def warn(self, warnings):
        """On stderr, at every verbosity: a file read with --accept-unkeyed is unproven."""
        for warning in warnings:
            self.stderr.write(self.style.WARNING(warning))

    def report(self, plan, verbosity):
        """What the restore would do, table by table, and every reason it would refuse."""
        if verbosity < 1:
            return
        for table, n in plan.rows.items():
            here = plan.here.get(table)
            now = "" if here is None else f"; {here} here now"
            if here and plan.replace:
                now += " (kept, matched by name)" if table == Group._meta.db_table else " (deleted)"
            self.stdout.write(f"  {table}: {n} rows in the file{now}")
        for note in plan.notes:
            self.stdout.write(f"  {note}")
        for problem in plan.problems:
            self.stdout.write(self.style.WARNING(f"A restore would refuse: {problem}"))
        total = sum(plan.rows.values())
        if plan.problems:
            verdict = f"{total} rows; a restore would refuse (see above)"
        else:
            replaced = sum(plan.here.values())
            verdict = f"a restore would write {total} rows" + (
                f" and replace {replaced} rows here" if replaced else ""
            )
        state = (
            "matches its checksums, but is unkeyed (its integrity cannot be proven)"
            if plan.warnings
            else "is intact (its HMAC matches)"
        )
        self.stdout.write(
            self.style.SUCCESS(f"Dry run: {plan.path} {state}; {verdict}. Nothing was written.")
        )
