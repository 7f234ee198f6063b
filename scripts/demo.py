#!/usr/bin/env python
"""Run the whole recipe end to end and show each step's output.

Usage: scripts/demo.py [N]    (make demo; N fake legacy users, default 2000)

On the configured database (the SQLite file by default, or DATABASE_URL):
  1. populate the legacy table with N fake users, 2% of them with real-world defects;
  2. pre-flight: list the rows the new schema cannot take (the default policy would refuse);
  3. back up every account table;
  4. copy the users (migration 0002, then a re-sync) leaving the rejected rows behind;
  5. sign a migrated staff user in with the password they had before the copy, and print
     that account: it can sign in to the app and see the counts at /status/.
Re-running adds N more legacy users and copies only those.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "legacy-password"


def step(title: str, *args: str, expect_failure: bool = False, **env: str) -> None:
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env})
    if proc.returncode != 0 and not expect_failure:
        sys.exit(f"demo stopped: `{' '.join(args)}` failed (exit status {proc.returncode}).")


def main() -> None:
    n = sys.argv[1] if len(sys.argv) > 1 else "2000"
    step(
        f"1. {n} fake legacy users, 2% with defects",
        "manage.py", "populate_fake_user_bulk", n, "--dirty", "0.02", "--migrate",
        "--password", PASSWORD,
    )  # fmt: skip
    step(
        "2. Pre-flight: what the new schema cannot take (the default policy refuses them)",
        "manage.py", "check_user_migration", expect_failure=True,
    )  # fmt: skip
    step("3. Backup before the copy", "scripts/backup.py")
    step(
        "4. Copy valid users into NewUser + Profile, leaving rejected rows behind",
        "manage.py", "migrate", "--no-input", USER_COPY_SKIP_INVALID="on",
    )  # fmt: skip
    step("   Re-sync (copies only what is new)", "manage.py", "copy_users", "--skip-invalid")

    print("\n=== 5. A migrated staff user signs in with the old password", flush=True)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib.auth import authenticate

    from account.models import NewUser

    # About 1% of fake users are staff, drawn independently of the 97% who are active.
    staff = NewUser.objects.filter(is_staff=True, is_active=True).order_by("-pk").first()
    if staff is None:
        sys.exit(
            f"demo stopped: none of the {NewUser.objects.count()} migrated users is active staff "
            "(about 1 in 100 is): run it again to add more, or "
            "`python manage.py createsuperuser`."
        )
    if authenticate(username=staff.username, password=PASSWORD) != staff:
        sys.exit("demo failed: a migrated user could not sign in with the old password.")
    print(f"authenticate({staff.username!r}, {PASSWORD!r}) -> {staff.full_name} (staff)")
    print(
        "\nDone. Serve the app with `make run`, sign in at http://127.0.0.1:8000/login/ as "
        f"{staff.username} / {PASSWORD}, and see the migration's state at /status/."
    )


if __name__ == "__main__":
    main()
