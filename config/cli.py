"""Run a management command and turn configuration and connection errors into one line.

`manage.py` and the scripts under `scripts/` go through `main()`, so a malformed
DATABASE_URL or a database that is down ends with a clear message and exit status 1,
not a page of traceback.
"""

import os
import sys


def database_hint() -> str:
    url = os.environ.get("DATABASE_URL") or "the default SQLite file"
    # Never print a password that may be in the URL.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://…@{rest.rsplit('@', 1)[1]}"
    return url


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.exceptions import ImproperlyConfigured

    try:
        from django.core.management import execute_from_command_line
        from django.db.utils import InterfaceError, OperationalError

        execute_from_command_line(argv)
    except ImproperlyConfigured as exc:
        sys.exit(f"Configuration error: {exc}")
    except (OperationalError, InterfaceError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        sys.exit(f"Database error ({database_hint()}): {first_line}")
    except KeyboardInterrupt:
        sys.exit("Interrupted.")
