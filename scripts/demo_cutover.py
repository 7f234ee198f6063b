#!/usr/bin/env python
"""Show the cut-over end to end: deploy 1, sync, a signed-in user, cut-over, still signed in.

Usage: scripts/demo_cutover.py [N]    (make demo-cutover; N fake legacy users, default 2000)

On a database of its own: the SQLite file demo-cutover.sqlite3 (made again on each run), or
DATABASE_URL when it names an empty database (PostgreSQL). Each deploy is a process of its own
with its own AUTH_USER_MODEL, as on a real server:
  1. deploy 1 (AUTH_USER_MODEL=account.User): migrate, N fake legacy users, the sync fills
     NewUser; a user signs in to the old app and gets a session cookie;
  2. the old app keeps living: an admin bans a user, a user signs up; the cut-over's final
     sync will carry both;
  3. deploy 2 (AUTH_USER_MODEL=account.NewUser): `manage.py cutover`;
  4. the new app: the same session cookie is still signed in; the late signup arrived, the ban
     too; an old
     app instance that still writes to the legacy table is refused, with the way back.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "legacy-password"
OLD, NEW = "account.User", "account.NewUser"


def env(model: str) -> dict:
    values = {**os.environ, "AUTH_USER_MODEL": model, "SECURE_SSL_REDIRECT": "off"}
    values.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    return values


def step(title: str, model: str, *args: str) -> str:
    print(f"\n=== {title}\n$ AUTH_USER_MODEL={model} python {' '.join(args)}", flush=True)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env(model), capture_output=True, text=True
    )
    print((proc.stdout + proc.stderr).rstrip(), flush=True)
    if proc.returncode != 0:
        sys.exit(f"demo stopped: `{' '.join(args)}` failed (exit status {proc.returncode}).")
    return proc.stdout


def in_app(model: str, action: str, *args: str) -> str:
    """Run one of the `app_*` functions below in a process of that deploy."""
    return step(f"   as the app ({model})", model, __file__, "--app", action, *args)


def database() -> None:
    """A database of the demo's own: it is built under deploy 1 from nothing."""
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        path = ROOT / "demo-cutover.sqlite3"
        path.unlink(missing_ok=True)
        os.environ["DATABASE_URL"] = f"sqlite:///{path}"
        return
    out = subprocess.run(
        [sys.executable, __file__, "--app", "tables"],
        cwd=ROOT, env=env(OLD), capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit((out.stdout + out.stderr).strip().splitlines()[-1])
    if out.stdout.strip() != "0":
        sys.exit(
            "demo-cutover builds deploy 1 from nothing, but DATABASE_URL names a database with "
            "tables: point it at a new, empty database (or unset it for SQLite)."
        )


def main(n: str) -> None:
    database()
    print(f"Database: {os.environ['DATABASE_URL'].split('@')[-1]}")
    step("1. Deploy 1: the old model is the user model", OLD, "manage.py", "migrate", "-v", "0")
    step(f"   {n} legacy users", OLD, "manage.py", "populate_fake_user_bulk", n,
         "--password", PASSWORD)  # fmt: skip
    step("   The sync makes NewUser a mirror", OLD, "manage.py", "copy_users")
    cookie = in_app(OLD, "sign_in").split()[-1]

    print("\n=== 2. The old app keeps living: an admin bans a user, one more user signs up")
    banned = in_app(OLD, "ban").split()[-1]
    late = in_app(OLD, "sign_up").split()[-1]

    step("3. Deploy 2: the cut-over (the old app is stopped)", NEW, "manage.py", "cutover")

    print("\n=== 4. The new app, with the same session cookie", flush=True)
    in_app(NEW, "account_page", cookie)
    in_app(NEW, "find", late)
    in_app(NEW, "check_banned", banned)
    print("\n   An old app instance still running tries to write to the legacy table:")
    in_app(OLD, "old_write")
    print(
        "\nDone: the session survived because the id, the password hash and the backend path "
        "are the same on both sides (docs/cutover.md). Undo with `make cutover-rollback` "
        "(AUTH_USER_MODEL=account.User)."
    )


# --- what the app does, run inside a process of one deploy -----------------------------------


def app_tables():
    from django.db import connection

    print(len(connection.introspection.table_names()))


def _client():
    from django.test import Client
    from django.test.utils import setup_test_environment

    setup_test_environment()  # lets the test client's host through ALLOWED_HOSTS
    return Client()


def app_sign_in():
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(is_active=True).order_by("pk").last()
    client = _client()
    response = client.post("/login/", {"username": user.username, "password": PASSWORD})
    assert response.status_code == 302, "sign-in failed"
    print(f"{user.username} signed in to the old app ({type(user).__name__} {user.pk}).")
    print(f"session cookie: {client.cookies['sessionid'].value}")


def app_sign_up():
    from account.models import User

    user = User.objects.create_user("late.signup", "late@example.com", PASSWORD)
    print(f"late.signup signed up in the old app after the sync: legacy id {user.pk}")


def app_ban():
    from account.models import User

    # Not the user signed in above (the last one): a ban would end their session, rightly.
    user = User.objects.filter(is_active=True, is_staff=False).order_by("pk").first()
    User.objects.filter(pk=user.pk).update(is_active=False)
    print(f"{user.username} banned in the old app after the sync: legacy id {user.pk}")


def app_check_banned(pk):
    from account.models import NewUser

    if NewUser.objects.get(pk=pk).is_active:
        sys.exit(f"User {pk} was banned in the old app but is active in NewUser.")
    print(f"User {pk} is banned in NewUser too: the cut-over's sync carried the ban.")


def app_account_page(cookie):
    client = _client()
    client.cookies["sessionid"] = cookie
    response = client.get("/account/me/")
    user = response.wsgi_request.user
    if response.status_code != 200:
        sys.exit("The session did not survive the cut-over.")
    print(
        f"GET /account/me/ -> 200, signed in as {user.username} ({user._meta.object_name} {user.pk})"
    )


def app_find(pk):
    from account.models import NewUser

    user = NewUser.objects.filter(pk=pk).first()
    if user is None:
        sys.exit(f"The late signup (id {pk}) is not in NewUser.")
    print(f"{user.username} (id {pk}) is in NewUser: the cut-over's sync carried them.")


def app_old_write():
    from django.db import DatabaseError

    from account.models import User

    try:
        User.objects.filter(pk=User.objects.order_by("pk").first().pk).update(full_name="x")
    except DatabaseError as exc:
        print(f"refused: {str(exc).splitlines()[0]}")
    else:
        sys.exit("The legacy table took a write after the cut-over.")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--app":
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        globals()[f"app_{sys.argv[2]}"](*sys.argv[3:])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "2000")
