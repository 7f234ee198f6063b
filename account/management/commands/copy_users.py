"""Bring NewUser in line with the legacy table: the re-sync behind `make migrate-data`."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError
from django.utils import timezone

from account.dbutil import table_exists
from account.follower import follow, summary_line
from account.management.base import OneLineErrorCommand
from account.models import ChangeLog, NewUser, OperationLog, Profile, SyncState, User
from account.progress import progress
from account.usercopy import BATCH, CopyError, CopyModels, copy_users

MODELS = CopyModels(
    legacy=User, new=NewUser, profile=Profile, state=SyncState, log=OperationLog, changes=ChangeLog
)


class Command(OneLineErrorCommand):
    help = (
        "Sync NewUser with the legacy user table: insert legacy users not copied yet, carry "
        "every change made in the legacy table since the last sync (fields, groups, "
        "permissions, renames, deletions) and report users changed on both sides. One "
        "transaction, verified field by field. Migration 0002 does the first copy; this "
        "command repeats it safely, as often as needed until the cut-over."
    )
    dry_run_default = False

    def add_arguments(self, parser):
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            default=settings.USER_COPY_SKIP_INVALID,
            help="Write every valid row and leave the rejected ones (and conflicts) as they "
            "are, listed in the report. Default: one rejected row stops the sync and nothing "
            "is written (or USER_COPY_SKIP_INVALID from the environment).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=BATCH,
            help=f"Rows streamed through Python per batch: the legacy rows checked and, when "
            f"the sync writes, the new rows verified (default: {BATCH}). Memory holds about two "
            "batches, plus the ids of rejected and deleted users.",
        )
        parser.add_argument(
            "--full",
            action="store_true",
            help="Compare every legacy user with its sync state, as the first copy does, even "
            "when the change log (PostgreSQL) says which users were written since the last sync.",
        )
        if self.dry_run_default:
            return
        parser.add_argument(
            "--follow",
            action="store_true",
            help="Keep running: sync once, then carry each legacy write as it commits "
            "(PostgreSQL: LISTEN for the change log's NOTIFY). SIGTERM or Ctrl-C finishes the "
            "sync in hand and exits 0; a second follower refuses. `make up` runs one (the "
            "`sync` service).",
        )
        parser.add_argument(
            "--alive-file",
            type=Path,
            help="With --follow: touch this file at least every 5 s while the follower waits, "
            "and after each sync, for a healthcheck that reads its age (docker-compose.yml).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check every row and write the report, but write nothing to the database.",
        )

    def handle(self, *args, skip_invalid, batch_size, verbosity, full, **options):
        dry_run = options.get("dry_run", self.dry_run_default)
        follow = options.get("follow", False)
        if batch_size <= 0:
            raise CommandError("--batch-size must be greater than 0")
        if follow and (dry_run or full):
            raise CommandError(
                "--follow writes, from the change log: without --dry-run and --full (run "
                "`copy_users --full` once, then follow)."
            )
        if follow:  # it waits for the migrations itself (a service started with the stack)
            return self.follow(skip_invalid, batch_size, verbosity, options.get("alive_file"))
        if not all(table_exists(model) for model in (User, NewUser, SyncState)):
            raise CommandError(
                "The account tables do not exist: run `python manage.py migrate` first."
            )
        bar = progress(None, "check" if dry_run else "sync", verbosity=verbosity, unit="users")

        def advance(n):
            bar.update(n)
            if verbosity >= 2:  # a line per batch, for logs and pipes where no bar is shown
                self.stdout.write(f"  {bar.n} of {bar.total} legacy users processed")
                self.stdout.flush()

        try:
            result = copy_users(
                MODELS,
                full=full,
                skip_invalid=skip_invalid,
                dry_run=dry_run,
                batch_size=batch_size,
                report_dir=settings.REPORT_DIR,
                on_start=lambda total: setattr(bar, "total", total),
                on_progress=advance,
            )
        except CopyError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            bar.close()
        self.report(result, skip_invalid, verbosity)

    def follow(self, skip_invalid, batch_size, verbosity, alive_file):
        def say(line, style=None):
            if verbosity >= 1:
                self.stdout.write(style(line) if style else line)
                self.stdout.flush()

        def synced(result):
            if result.written or result.rejected_total:
                say(
                    f"{timezone.localtime():%H:%M:%S} inserted {result.copied}, updated "
                    f"{result.updated}, deleted {result.deleted} users ({result.log_rows} log "
                    f"rows, {result.seconds * 1000:.0f} ms)"
                    + (
                        f"; {result.rejected_total} rejected rows stay, listed in {result.report}"
                        if result.rejected_total
                        else ""
                    )
                )

        def refused(message):
            self.stderr.write(f"copy_users --follow: the sync refused: {message}")

        try:
            done = follow(
                MODELS,
                skip_invalid=skip_invalid,
                batch_size=batch_size,
                report_dir=settings.REPORT_DIR,
                on_sync=synced,
                on_refused=refused,
                on_idle=say,
                alive_file=alive_file,
                on_ready=lambda: say(
                    "Following the change log: each legacy write is carried as it commits. "
                    "SIGTERM or Ctrl-C stops after the sync in hand."
                ),
            )
        except CopyError as exc:
            raise CommandError(str(exc)) from exc
        say(summary_line(done), self.style.SUCCESS)

    def report(self, result, skip_invalid, verbosity):
        if verbosity < 1:
            return
        if not result.pending:
            self.stdout.write(
                self.style.SUCCESS(
                    "Nothing to do: no legacy user was written since the last sync (change log)."
                    if result.legacy_total is None
                    else f"Nothing to do: NewUser mirrors the {result.legacy_total} legacy users."
                )
            )
            if verbosity >= 2:
                self.stdout.write(result.source_line())
            return
        for line in result.lines():
            self.stdout.write(line)
        done = (
            f"Inserted {result.copied}, updated {result.updated}, deleted {result.deleted} "
            "users, verified"
        )
        if result.rejected_total:
            self.stdout.write(
                self.style.WARNING(
                    f"{done}; {result.rejected_total} rejected rows stay as they are, listed "
                    f"in {result.report}."
                )
            )
        else:
            self.stdout.write(self.style.SUCCESS(f"{done}."))
