#!/usr/bin/env python
"""Benchmark the user copy (migration 0002) on PostgreSQL against the SQL limit.

Usage: bench/bench_migrate.py [N]      (make bench-migrate N=1000000; default 1,000,000)

Steps, each measured in its own process (wall seconds, users/s, peak RSS; the SQL baselines
in this one) after a CHECKPOINT, so that none pays for writing back what the step before it
left dirty, with the WAL it wrote and the checkpoints that volume started. Twice: on a new
database of N/10 legacy users, then on one of N (1% of them in a group, and VACUUM (ANALYZE)
after loading, as a live database has long been vacuumed):
  - the SQL baselines (below), each followed by a TRUNCATE of the new tables;
  - the pre-flight (`check_user_migration`);
  - the copy, `migrate account 0002`;
  - re-syncs (`copy_users`): with nothing changed, then with 1% of the legacy users changed
    (password, email, flags, name) and 0.1% deleted; the simplest alternative is copying
    everything again, so the full copy is their baseline;
  - the way back, `migrate account 0001`;
  - then, on N only: `migrate` to the end (the copy again, and the change capture triggers),
    and the log-driven re-syncs beside the full compare (`copy_users --full`), in this
    process so that no interpreter start-up is counted: nothing changed (median of 5 runs),
    then 1% changed and 0.1% deleted (median of 3, each on users of its own); the same code
    as bench/bench_changelog.py, which also measures the writers' cost.
N against N/10 shows how time and memory grow with the table (goal: time at most 11x for ten
times the users, peak RSS the same within 10%). The SQL baselines are the same copy as plain SQL
(INSERT ... SELECT for users, profiles and group links, plus the count checks), once into the
indexed tables and once loading first and building the indexes after, as the copy does; each
runs in a transaction that is rolled back.
"""

import sys
import time

from common import Measured, manage, on_clean_server, recreate_database, report, setup_django

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


def settle() -> None:
    """VACUUM (ANALYZE) the database after loading it, as a live database has long been: the
    rows' hint bits set, the visibility map and the statistics up to date. Without it the first
    step to read the fresh rows pays for that, and which step it is differs between the sizes
    measured (the pre-flight, or the copy)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")


def empty_new_tables() -> None:
    """Truncate the new-side tables: a rolled-back load leaves its dead rows' pages behind."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE account_newuser, account_profile, account_newuser_groups, "
            "account_newuser_user_permissions, account_syncstate CASCADE"
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


def stage(n: int, name: str) -> dict[str, Measured]:
    """A new database with n legacy users (1% in a group), vacuumed; then, each measured: the
    SQL baselines, the pre-flight, the copy, the two re-syncs and the way back."""
    from django.db import connections

    connections.close_all()  # the database is dropped under this process's connection
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0")
    manage("populate", "populate_fake_user_bulk", str(n), "-v0")
    add_groups()
    settle()
    runs = {}
    for key, after, label in (("sql_indexed", False, "indexed tables"),
                              ("sql_after", True, "indexes built after")):  # fmt: skip
        label = f"@{n} SQL INSERT ... SELECT {name}, {label}"
        runs[key] = on_clean_server(lambda a=after, t=label: Measured(t, sql_limit(a), 0))
        empty_new_tables()

    def step(key, label, *args):
        runs[key] = on_clean_server(lambda: manage(f"@{n} {label}", *args))

    step("check", f"pre-flight {name} (check_user_migration)", "check_user_migration")
    step("copy", f"copy {name} (migrate account 0002)", "migrate", "account", "0002")
    step("resync", f"re-sync {name}, nothing changed (copy_users)", "copy_users")
    change_one_percent()
    step("resync_1", f"re-sync {name}, 1% changed, 0.1% deleted", "copy_users")
    step("undo", f"undo {name} (migrate account 0001)", "migrate", "account", "0001")
    return runs


GROWTH = (
    ("check", "pre-flight"),
    ("copy", "copy"),
    ("resync", "re-sync, nothing changed"),
    ("resync_1", "re-sync, 1% changed"),
    ("undo", "the way back"),
    ("sql_indexed", "SQL, indexed tables"),
    ("sql_after", "SQL, indexes built after"),
)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    setup_django()
    small = stage(n // 10, "N/10")
    full = stage(n, "N")
    report("User copy: users + profiles + groups + verification", n,
           [*small.values(), *full.values()])  # fmt: skip
    print()
    for runs, name in ((small, "N/10"), (full, "N")):
        copy = runs["copy"].seconds
        print(
            f"  copy of {name}: {copy:.1f} s = {copy / runs['sql_after'].seconds:.1f}x the SQL "
            f"copy with the same index strategy, {copy / runs['sql_indexed'].seconds:.1f}x plain "
            f"INSERT ... SELECT into indexed tables"
        )
    print("  N against N/10, in this run (time ratio; peak RSS at N/10 -> at N):")
    for key, what in GROWTH:
        a, b = small[key], full[key]
        rss = f"{a.rss_mb:.0f} MB -> {b.rss_mb:.0f} MB" if a.rss_mb else ""
        print(f"    {what:<26} {b.seconds / a.seconds:5.1f}x   {rss}")
    copy, resync, resync_1 = full["copy"], full["resync"], full["resync_1"]
    print(
        f"  re-sync, nothing changed: {resync.seconds:.1f} s ({copy.seconds / resync.seconds:.0f}x "
        f"faster than copying again); 1% changed: {resync_1.seconds:.1f} s "
        f"({copy.seconds / resync_1.seconds:.0f}x faster)"
    )
    print(f"  {[line.strip() for line in resync_1.output.splitlines()][:2]}")
    summary = [line.strip() for line in copy.output.splitlines() if "insert" in line]
    print(f"  {summary[0] if summary else ''}")
    change_log(n)


def change_log(n: int) -> None:
    """The log-driven re-syncs beside the full compare, on the database of N users."""
    from bench_changelog import median, resyncs
    from django.db import connections

    connections.close_all()
    manage(f"@{n} migrate to the end (copy again, capture triggers)", "migrate", "-v0")
    print(f"  change log, {n:,} users (copy_users in process, median of 5 runs, 3 for 1%):")
    syncs = resyncs(3)
    for what in ("nothing", "1%"):
        log, full = median(syncs[f"{what}, log"]), median(syncs[f"{what}, full"])
        print(
            f"    {what} changed: {log * 1000:.0f} ms from the log against {full * 1000:.0f} ms "
            f"for the full compare ({full / log:.1f}x)"
        )


if __name__ == "__main__":
    main()
