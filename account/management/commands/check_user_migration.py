"""Pre-flight: list every legacy row the sync cannot take, and why. Writes nothing."""

from django.core.management.base import CommandError

from .copy_users import Command as CopyCommand


class Command(CopyCommand):
    help = (
        "Read the legacy user table and list every row the sync would reject (with the "
        "reason, in a CSV report) and every user changed on both sides; print what the sync "
        "would do and the password hash algorithms found. Writes nothing to the database. "
        "Exits non-zero when the sync would refuse under the chosen policy. With -v 0 it "
        "prints nothing and keeps no report unless it refuses."
    )
    dry_run_default = True

    def report(self, result, skip_invalid, verbosity):
        refuses = result.rejected_total and not skip_invalid
        if verbosity < 1 and not refuses and result.report:
            result.report.unlink()  # a gate in a script: the sync writes its own report
            result.report = None
        if verbosity >= 1 and result.pending:
            for line in result.lines():
                self.stdout.write(line)
        if refuses:
            raise CommandError(
                f"{result.rejected_total} legacy users cannot be synced as they are "
                f"({result.reasons()}); the sync would write nothing. See {result.report}. Fix those rows, or write the valid "
                "rows and leave these behind with USER_COPY_SKIP_INVALID=on "
                "(make migrate-data SKIP_INVALID=1)."
            )
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
        elif result.rejected_total:
            self.stdout.write(
                self.style.WARNING(
                    f"{result.rejected_total} rows would be left as they are "
                    f"(USER_COPY_SKIP_INVALID is on); the rest would be synced."
                )
            )
        else:
            self.stdout.write(
                self.style.SUCCESS("Every pending legacy user can be synced as it is.")
            )
