"""The way back from the cut-over: carry NewUser's writes into the legacy table, re-point back."""

from account.cutover import rollback

from .cutover import Command as CutoverCommand


class Command(CutoverCommand):
    help = (
        "Undo the cut-over (run it with AUTH_USER_MODEL=account.User, the new app stopped): "
        "check, back up, then in one transaction with NewUser writers blocked: carry NewUser's "
        "writes since the cut-over back into the legacy table (signups with their ids, changed "
        "passwords, emails, flags, groups and permissions, deleted users), re-point the foreign "
        "keys the cut-over moved back to the legacy table, move admin log entries back, make the "
        "legacy table writable; then validate. Values the legacy schema cannot hold are "
        "reported and refused (signups may be left out with --skip-invalid). Refuses when NewUser is empty "
        "or when it would delete more than 1% of the legacy users (at least 10, at most 1000) "
        "unless --allow-mass-delete. Run again, it changes nothing."
    )
    run = staticmethod(rollback)
    noun = "rollback"
    dry_run_help = "Compare both tables and list what would be carried back; change nothing."
    skip_help = (
        "Leave signups the legacy schema cannot hold out of the legacy table (reported) "
        "instead of refusing; a row referencing one still stops the rollback. A user the "
        "legacy table holds is never left out: its new-side changes would be lost."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "--allow-mass-delete",
            action="store_true",
            help="Delete the legacy users whose NewUser rows are gone even when they are more "
            "than 1%% of the legacy users (at least 10, at most 1000); without it the rollback "
            "refuses, as so many usually means NewUser lost rows.",
        )

    def run_options(self, options) -> dict:
        return {"allow_mass_delete": options["allow_mass_delete"]}

    def nothing_line(self, when) -> str:
        return (
            f"Not cut over, the legacy table is live{when}: nothing to roll back, nothing changed."
        )

    def done_line(self, outcome) -> str:
        c = outcome.counts
        return (
            f"Rolled back to account.User: carried back {c['signups']} signups and "
            f"{c['changed_users']} changed users, deleted {c['deleted']}; "
            f"{len(outcome.constraints)} foreign keys re-pointed back, "
            f"{outcome.admin_log_entries} admin log entries moved back. Start the app with "
            "AUTH_USER_MODEL=account.User."
        )
