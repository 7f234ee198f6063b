#!/usr/bin/env python
"""Benchmark the user copy (migration 0002) on PostgreSQL against the SQL limit.

Usage: bench/bench_migrate.py [N]      (make bench-migrate N=1000000; default 1,000,000)

Steps, each measured in its own process (wall seconds, users/s, peak RSS):
  - populate N/10 legacy users (1% in a group), copy them with `migrate account 0002`,
    then undo it with `migrate account 0001`;
  - populate up to N, copy again: memory must not grow with N;
  - pre-flight (`check_user_migration`) over the same N rows;
  - re-syncs (`copy_users`) after the copy of N: with nothing changed, then with 1% of the
    legacy users changed (password, email, flags, name) and 0.1% deleted; the simplest
    alternative is copying everything again, so the full copy is their baseline;
and, in the same run, the same copy as plain SQL (INSERT ... SELECT for users, profiles and
group links, plus the count checks), once into the indexed tables and once loading first and
building the indexes after, as the copy does. The SQL runs in a transaction that is rolled back.
"""

import sys
import time

from common import Measured, manage, recreate_database, report, setup_django

SQL_COPY = [
    """INSERT INTO account_newuser (id, password, last_login, is_superuser, username, email,
       full_name, date_of_birth, phone_number, is_active, is_staff, joined_at, updated_at)
       SELECT id, password, last_login, is_superuser, username, trim(email), full_name,
       date_of_birth, '+977' || phone_number, is_active, is_staff, now(), now()
       FROM account_user""",
    """INSERT INTO account_profile (user_id, bio, avatar, updated_at)
       SELECT id, '', '', now() FROM account_newuser""",
    """INSERT INTO account_newuser_groups (newuser_id, group_id)
       SELECT user_id, group_id FROM account_user_groups""",
    """SELECT count(*) FROM account_newuser n JOIN account_user l ON l.id = n.id
       WHERE n.username <> l.username OR n.password <> l.password""",
]


def add_groups() -> None:
    """Put 1% of the legacy users in a group, so the copy has links to copy."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO auth_group (name) VALUES ('bench') ON CONFLICT DO NOTHING")
        cursor.execute(
            "INSERT INTO account_user_groups (user_id, group_id) SELECT u.id, g.id "
            "FROM account_user u, auth_group g WHERE g.name = 'bench' AND u.id % 100 = 0 "
            "ON CONFLICT DO NOTHING"
        )


def change_one_percent() -> None:
    """What a live legacy app does between two syncs: 1% of users changed, 0.1% deleted."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE account_user SET password = 'md5$x$' || md5(id::text), "
            "email = 'changed.' || email, is_active = NOT is_active, full_name = 'Changed' "
            "WHERE id % 100 = 7"
        )
        cursor.execute(
            "DELETE FROM account_user_groups WHERE user_id IN "
            "(SELECT id FROM account_user WHERE id % 1000 = 3)"
        )
        cursor.execute("DELETE FROM account_user WHERE id % 1000 = 3")


def sql_limit(build_indexes_after: bool) -> float:
    from django.db import connection, transaction

    from account.dbutil import indexes_built_after
    from account.models import NewUser, Profile

    class Rollback(Exception):
        pass

    started = time.perf_counter()
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            if build_indexes_after:
                with indexes_built_after([NewUser, Profile]):
                    for sql in SQL_COPY[:3]:
                        cursor.execute(sql)
            else:
                for sql in SQL_COPY[:3]:
                    cursor.execute(sql)
            cursor.execute(SQL_COPY[3])
            assert cursor.fetchone()[0] == 0
            raise Rollback
    except Rollback:
        pass
    return time.perf_counter() - started


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0")
    manage("populate", "populate_fake_user_bulk", str(n // 10), "-v0")
    setup_django()
    add_groups()
    small = manage(f"@{n // 10} copy N/10 (migrate account 0002)", "migrate", "account", "0002")
    undo_small = manage(
        f"@{n // 10} undo N/10 (migrate account 0001)", "migrate", "account", "0001"
    )
    manage("populate", "populate_fake_user_bulk", str(n - n // 10), "-v0")
    add_groups()
    check = manage(f"@{n} pre-flight check_user_migration N", "check_user_migration")
    full = manage(f"@{n} copy N (migrate account 0002)", "migrate", "account", "0002")
    resync = manage(f"@{n} re-sync N, nothing changed (copy_users)", "copy_users")
    change_one_percent()
    resync_1 = manage(f"@{n} re-sync N, 1% changed, 0.1% deleted", "copy_users")
    undo = manage(f"@{n} undo N (migrate account 0001)", "migrate", "account", "0001")

    limit_indexed = Measured(f"@{n} SQL INSERT ... SELECT, indexed tables", sql_limit(False), 0)
    limit_after = Measured(f"@{n} SQL INSERT ... SELECT, indexes built after", sql_limit(True), 0)
    report("User copy: users + profiles + groups + verification", n,
           [small, undo_small, check, full, resync, resync_1, undo, limit_indexed,
            limit_after])  # fmt: skip
    print(
        f"\n  copy of N: {full.seconds:.1f} s = {full.seconds / limit_after.seconds:.1f}x the SQL "
        f"limit with the same index strategy, {full.seconds / limit_indexed.seconds:.1f}x plain "
        f"INSERT ... SELECT into indexed tables"
    )
    print(f"  peak RSS: {small.rss_mb:.0f} MB at N/10, {full.rss_mb:.0f} MB at N")
    print(
        f"  re-sync, nothing changed: {resync.seconds:.1f} s ({full.seconds / resync.seconds:.0f}x "
        f"faster than copying again); 1% changed: {resync_1.seconds:.1f} s "
        f"({full.seconds / resync_1.seconds:.0f}x faster), {resync_1.rss_mb:.0f} MB"
    )
    print(f"  {[line.strip() for line in resync_1.output.splitlines()][:2]}")
    summary = [line.strip() for line in full.output.splitlines() if "insert" in line]
    print(f"  {summary[0] if summary else ''}")


if __name__ == "__main__":
    main()
