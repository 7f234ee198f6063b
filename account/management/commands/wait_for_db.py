"""Wait until the database accepts connections (the container's entrypoint calls this)."""

import time

from django.core.management.base import CommandError
from django.db import connection
from django.db.utils import OperationalError

from account.management.base import OneLineErrorCommand


class Command(OneLineErrorCommand):
    help = "Wait until the database accepts connections, up to --timeout seconds."

    def add_arguments(self, parser):
        parser.add_argument(
            "--timeout", type=float, default=60, help="Seconds to wait at most (default: 60)."
        )

    def handle(self, *args, timeout, verbosity, **options):
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                connection.ensure_connection()
                break
            except OperationalError as exc:
                if time.monotonic() >= deadline:
                    first_line = (str(exc).strip().splitlines() or ["no answer"])[0]
                    raise CommandError(
                        f"The database did not accept connections within {timeout:g} s: "
                        f"{first_line}"
                    ) from None
                if not said and verbosity > 0:
                    self.stderr.write("Waiting for the database...")
                    said = True
                connection.close()
                time.sleep(1)
        if verbosity > 0:
            self.stdout.write("The database is ready.")
