"""Run a management command and turn configuration and connection errors into one line.

`manage.py` and the scripts under `scripts/` go through `main()`, so a malformed
DATABASE_URL, a database that is down or a mistyped command name ends with a clear message
and exit status 1, not a page of traceback. Bad arguments to the project's own commands are
handled by their base class, `account.management.base.OneLineErrorCommand`.
"""

import difflib
import os
import sys

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import ManagementUtility, get_commands
from django.db.utils import InterfaceError, OperationalError

from config.dburl import mask_password, mask_passwords_in


def database_hint() -> str:
    """The database in use, for messages: DATABASE_URL with its password masked."""
    url = os.environ.get("DATABASE_URL")
    return mask_password(url) if url else "the default SQLite file"


def _without_password(text: str) -> str:
    """`text` with DATABASE_URL, wherever it appears, shown with its password masked, and any
    other `user:password@` in it masked too (a server's message may quote part of the URL)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        text = text.replace(url, mask_password(url))
    return mask_passwords_in(text)


class CommandLine(ManagementUtility):
    """Django's `manage.py`, saying "unknown command" in one line instead of three."""

    def fetch_command(self, subcommand):
        commands = get_commands()
        if subcommand not in commands:
            # get_commands() hides a settings error behind "unknown command": raise it again,
            # as Django's own fetch_command does.
            settings.INSTALLED_APPS  # noqa: B018
            close = difflib.get_close_matches(subcommand, commands, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            sys.exit(
                f"{self.prog_name}: error: unknown command {subcommand!r}; "
                f"{guess}`{self.prog_name} help` lists the commands."
            )
        return super().fetch_command(subcommand)


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    try:
        CommandLine(argv).execute()
    except ImproperlyConfigured as exc:
        sys.exit(f"Configuration error: {_without_password(str(exc))}")
    except (OperationalError, InterfaceError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        sys.exit(f"Database error ({database_hint()}): {_without_password(first_line)}")
    except KeyboardInterrupt:
        sys.exit("Interrupted.")
