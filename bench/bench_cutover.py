#!/usr/bin/env python
"""Benchmark the cut-over (and its rollback) on PostgreSQL at N users.

Usage: bench/bench_cutover.py [N]      (make bench-cutover N=1000000; default 1,000,000)

Set-up, as deploy 1 (AUTH_USER_MODEL=account.User), in a scratch database (BENCH_DATABASE_URL):
  - N legacy users (populate), copied by migration 0002 (the first copy);
  - shop_order: N rows referencing them, made with raw SQL (foreign key and index), and 10,000
    admin log entries about legacy users;
  - then 1% of the users change on the legacy side (password, email, is_active) and 0.1% sign
    up, after the last sync.
Measured, each in its own process: `manage.py cutover` as `make cutover` runs it, backup
included (the goal: <= 30 s in all, writers blocked <= 10 s). The baseline: the same foreign
key added in one step, validated under the lock, as a plain ALTER TABLE does (rolled back).
Then 1% of the users change on the new side and 0.1% sign up, and `cutover_rollback` runs.
"""

import re
import sys
import tempfile
import time

from common import Measured, manage, recreate_database, report, setup_django

OLD, NEW = "account.User", "account.NewUser"


def sql(*statements) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def build_deploy_1(n: int) -> None:
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0", AUTH_USER_MODEL=OLD)
    for app in ("admin", "auth", "contenttypes", "sessions"):
        manage("migrate", "migrate", app, "-v0", AUTH_USER_MODEL=OLD)
    manage("populate", "populate_fake_user_bulk", str(n), "-v0", AUTH_USER_MODEL=OLD)
    first = manage(f"@{n} first copy (migrate account 0002)", "migrate", AUTH_USER_MODEL=OLD)
    print(f"first copy: {first.seconds:.1f} s")
    setup_django()
    sql(
        """CREATE TABLE shop_order (id bigserial PRIMARY KEY,
           user_id bigint NOT NULL REFERENCES account_user (id) DEFERRABLE INITIALLY DEFERRED,
           total integer NOT NULL)""",
        "INSERT INTO shop_order (user_id, total) SELECT id, id % 1000 FROM account_user",
        "CREATE INDEX shop_order_user_id ON shop_order (user_id)",
        """INSERT INTO django_admin_log (action_time, user_id, content_type_id, object_id,
           object_repr, action_flag, change_message)
           SELECT now(), u.id, ct.id, u.id::text, u.username, 2, '[]'
           FROM account_user u, django_content_type ct
           WHERE ct.app_label = 'account' AND ct.model = 'user' AND u.id % 100 = 7""",
        "ANALYZE shop_order",
        "ANALYZE django_admin_log",
    )


def change_legacy_side(n: int) -> None:
    """1% of the users change after the last sync, 0.1% sign up (the old app keeps living)."""
    sql(
        """UPDATE account_user SET password = password || 'x', email = 'changed.' || email,
           is_active = NOT is_active WHERE id % 100 = 3""",
        f"""INSERT INTO account_user (password, is_superuser, username, email, full_name,
           phone_number, is_active, is_staff)
           SELECT '!', false, 'late' || g, 'late' || g || '@example.com', '', '', true, false
           FROM generate_series(1, {n // 1000}) g""",
        "ANALYZE account_user",
    )


def change_new_side(n: int) -> None:
    """After the cut-over: 1% of the users change on the new side, 0.1% sign up."""
    sql(
        "UPDATE account_newuser SET is_staff = NOT is_staff, full_name = 'x' WHERE id % 100 = 5",
        f"""INSERT INTO account_newuser (password, is_superuser, username, email, full_name,
           phone_number, is_active, is_staff, joined_at, updated_at)
           SELECT '!', false, 'new' || g, 'new' || g || '@example.com', '', '', true, false,
           now(), now() FROM generate_series(1, {n // 1000}) g""",
    )


def plain_alter_table() -> float:
    """The simplest alternative: the foreign key added and validated in one locked step."""
    from django.db import connection, transaction

    class Rollback(Exception):
        pass

    started = time.perf_counter()
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "ALTER TABLE shop_order ADD CONSTRAINT bench_plain FOREIGN KEY (user_id) "
                "REFERENCES account_newuser (id)"
            )
            raise Rollback
    except Rollback:
        pass
    return time.perf_counter() - started


def figure(pattern: str, output: str) -> float:
    found = re.search(pattern, output)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    build_deploy_1(n)
    change_legacy_side(n)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"BACKUP_DIR": f"{tmp}/backups", "REPORT_DIR": f"{tmp}/reports"}
        cut = manage(f"@{n} make cutover (backup included)", "cutover", AUTH_USER_MODEL=NEW, **dirs)
        again = manage(f"@{n} make cutover, again (nothing to do)", "cutover",
                       AUTH_USER_MODEL=NEW, **dirs)  # fmt: skip
        plain = Measured(
            f"@{n} baseline: ADD FOREIGN KEY validated under lock", plain_alter_table(), 0
        )
        change_new_side(n)
        back = manage(f"@{n} make cutover-rollback (backup included)", "cutover_rollback",
                      AUTH_USER_MODEL=OLD, **dirs)  # fmt: skip
    report("Cut-over: N users, N orders, 1% changed since the last sync", n,
           [cut, again, plain, back])  # fmt: skip
    blocked = figure(r"Writers were blocked for ([\d.]+) s", cut.output)
    print(f"\n  {cut.output.strip().splitlines()[-3]}")
    print(f"  make cutover: {cut.seconds:.1f} s in all (goal <= 30 s)")
    print(f"  writers blocked: {blocked:.1f} s (goal <= 10 s)")
    validate = figure(r"validate ([\d.]+) s", cut.output)
    print(
        f"  validating shop_order's new key afterwards took {validate:.1f} s without blocking "
        f"writers; validated under the lock (the baseline) it adds {plain.seconds:.1f} s per "
        "such table to the blocked time"
    )
    print(f"  rollback: {back.output.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
