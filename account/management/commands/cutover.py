"""Deploy 2's cut-over: move every reference from the legacy user table to NewUser."""

import math
from argparse import ArgumentTypeError

from django.conf import settings

from account.cutover import cutover, last_cutover
from account.management.base import OneLineErrorCommand


def seconds(value: str) -> float:
    """argparse type: a finite number of seconds greater than 0."""
    try:
        s = float(value)
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (math.isfinite(s) and s > 0):
        raise ArgumentTypeError(f"expected a number of seconds greater than 0, got {value}")
    return s


class Command(OneLineErrorCommand):
    help = (
        "Switch the database to AUTH_USER_MODEL=account.NewUser (run it with that setting, the "
        "old app stopped): check, sync the legacy changes, back up, then in one transaction "
        "with legacy writers blocked: final sync, re-point every foreign key to the legacy user "
        "table (found in the database catalog) to NewUser, move admin log entries, make the "
        "legacy tables read-only; then validate the new constraints. Refuses, changing nothing, "
        "when a row references a legacy user who is not in NewUser or when the sync has "
        "conflicts. Run again, it changes nothing. Undo with `cutover_rollback`."
    )
    run = staticmethod(cutover)
    noun = "cut-over"
    dry_run_help = "Run the checks and a dry-run sync, list what would move; change nothing."
    skip_help = (
        "The sync's policy: leave rejected legacy users behind (reported) instead of refusing; "
        "a row referencing one still stops the cut-over. Default: USER_COPY_SKIP_INVALID."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help=self.dry_run_help)
        parser.add_argument(
            "--skip-invalid",
            action="store_true",
            default=settings.USER_COPY_SKIP_INVALID,
            help=self.skip_help,
        )
        parser.add_argument(
            "--lock-timeout",
            type=seconds,
            default=5.0,
            help="Seconds to wait for the table locks before giving up with nothing changed; "
            "each lock statement waits at most this long in all (PostgreSQL; default: 5).",
        )

    def run_options(self, options) -> dict:
        """Options of this command only, passed on to `run`."""
        return {}

    def handle(self, *args, dry_run, skip_invalid, lock_timeout, verbosity, **options):
        def say(text, level=1):
            if verbosity >= level:
                self.stdout.write(text)
                self.stdout.flush()  # a line per step, also in logs and pipes

        outcome = self.run(
            dry_run=dry_run,
            skip_invalid=skip_invalid,
            lock_timeout=lock_timeout,
            say=say,
            **self.run_options(options),
        )
        if verbosity >= 1:
            self.stdout.write(self.style.SUCCESS(self.final_line(outcome, dry_run)))

    def final_line(self, outcome, dry_run) -> str:
        if outcome.nothing_to_do:
            when = ""
            if done := last_cutover():
                when = f" ({done.get_kind_display()} at {done.finished_at:%Y-%m-%d %H:%M:%S %Z})"
            return self.nothing_line(when)
        if dry_run:
            return "Dry run: nothing was changed."
        if "switch" not in outcome.steps:
            return f"The earlier {self.noun} is complete now: {len(outcome.validated)} validated."
        inner = ("final sync", "swap")  # parts of the switch
        steps = ", ".join(
            f"{name} {s:.1f} s" for name, s in outcome.steps.items() if name not in inner
        )
        parts = ", ".join(f"{n} {outcome.steps[n]:.1f} s" for n in inner if n in outcome.steps)
        self.stdout.write(f"Timings: {steps}{f' (switch: {parts})' if parts else ''}.")
        self.stdout.write(
            f"Writers were blocked for {outcome.blocked_seconds:.1f} s (the switch: final sync "
            "and constraint swap; readers too during the swap); the validation ran afterwards "
            "without blocking them."
        )
        return self.done_line(outcome)

    def nothing_line(self, when) -> str:
        return f"Already cut over{when}: nothing to do, nothing changed."

    def done_line(self, outcome) -> str:
        return (
            f"Cut over to account.NewUser: {len(outcome.constraints)} foreign keys re-pointed, "
            f"{outcome.admin_log_entries} admin log entries moved, the legacy table is "
            "read-only. Start the app with AUTH_USER_MODEL=account.NewUser."
        )
