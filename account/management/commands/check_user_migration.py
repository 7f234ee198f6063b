"""Pre-flight: list every legacy row the new schema cannot take, and why. Writes nothing."""

from django.core.management.base import CommandError

from .copy_users import Command as CopyCommand


class Command(CopyCommand):
    help = (
        "Read the legacy user table and list every row the new schema cannot take as it is, "
        "with the reason, in a CSV report; print a summary by reason. Writes nothing to the "
        "database. Exits non-zero when rows would be rejected under the chosen policy."
    )
    dry_run_default = True

    def report(self, result, skip_invalid, verbosity):
        super().report(result, skip_invalid, verbosity)
        if not result.rejected_total:
            if result.pending:
                self.stdout.write(
                    self.style.SUCCESS(f"All {result.copied} pending legacy users can be copied.")
                )
            return
        if skip_invalid:
            self.stdout.write(
                self.style.WARNING(
                    f"{result.rejected_total} rows will be left in the legacy table "
                    f"(USER_COPY_SKIP_INVALID is on); {result.copied} will be copied."
                )
            )
            return
        raise CommandError(
            f"{result.rejected_total} legacy users cannot be copied as they are; the copy would "
            f"write nothing. See {result.report}. Fix those rows, or copy the valid rows and "
            "leave these behind with USER_COPY_SKIP_INVALID=on (make migrate-data SKIP_INVALID=1)."
        )
