#!/usr/bin/env python
"""Benchmark the change log: log-driven re-syncs beside the full compare, and the writers' cost.

Usage: bench/bench_changelog.py [--runs R] [--writes W]

Runs on BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/accounts_bench), which
must hold legacy users copied to NewUser and be migrated (the capture triggers installed), as
`make bench-migrate` leaves a database after `python manage.py migrate`. Not dropped here.

In one run, each figure the median of R runs (default 3), every sync in this process (the
time of `copy_users` itself, no interpreter start-up), after a VACUUM:
  - re-sync with nothing changed: from the change log, then `--full`;
  - re-sync with 1% of the legacy users changed (password, email, flags, name) and 0.1%
    deleted: from the change log, then `--full`, each on users of its own;
  - the writers: W single-row UPDATEs (then INSERTs) of legacy users, each its own
    transaction (autocommit), with the capture triggers and with them disabled, in
    alternating blocks; and one UPDATE of 1% of the users in one statement, both ways.
    The writes made while the triggers were disabled are not in the log: the run ends by
    logging a 'full' row, so the next sync compares every user.
"""

import argparse
import os
import random
import statistics
import sys
import time

from common import BENCH_URL, setup_django

TRIGGERS = (
    ("account_user", "account_user_capture"),
    ("account_user", "account_user_capture_update"),
)


def sync(full=False):
    from django.conf import settings

    from account.models import ChangeLog, NewUser, OperationLog, Profile, SyncState, User
    from account.usercopy import CopyModels, copy_users

    models = CopyModels(
        legacy=User, new=NewUser, profile=Profile, state=SyncState, log=OperationLog,
        changes=ChangeLog,
    )  # fmt: skip
    started = time.perf_counter()
    result = copy_users(models, report_dir=settings.REPORT_DIR, full=full, skip_invalid=True)
    return time.perf_counter() - started, result


def sql(statement, params=()):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def change(residue: int) -> int:
    """1% of the users (id % 100 = residue) changed, 0.1% of them deleted; how many written."""
    sql(
        "UPDATE account_user SET password = 'md5$x$' || md5(id::text || %s), "
        "email = 'c' || %s || '.' || email, is_active = NOT is_active, full_name = 'Changed' "
        "WHERE id %% 100 = %s",
        [str(residue), str(residue), residue],
    )
    sql(
        "DELETE FROM account_user_groups WHERE user_id IN "
        "(SELECT id FROM account_user WHERE id %% 1000 = %s)",
        [residue],
    )
    sql("DELETE FROM account_user WHERE id %% 1000 = %s", [residue])


def median(values):
    return statistics.median(values)


def resyncs(runs: int) -> dict:
    out = {}
    sql("VACUUM (ANALYZE)")
    first, result = sync()
    print(f"  first sync ({result.source}: {result.source_reason or 'log'}): {first:.2f} s")
    out["nothing, log"] = [sync()[0] for _ in range(max(runs, 5))]
    out["nothing, full"] = [sync(full=True)[0] for _ in range(runs)]
    for source in ("log", "full"):
        times = []
        for i in range(runs):
            change(10 + i + (0 if source == "log" else 50))
            sql("VACUUM (ANALYZE) account_user")
            seconds, result = sync(full=source == "full")
            assert result.source == source, result.source_reason
            times.append(seconds)
            print(f"    1% changed, {source}: {seconds:.3f} s; {result.lines()[0]}")
        out[f"1%, {source}"] = times
    return out


def writers(writes: int) -> dict:
    import psycopg

    conn = psycopg.connect(BENCH_URL, autocommit=True)
    rng = random.Random(4)
    (top,) = conn.execute("SELECT max(id) FROM account_user").fetchone()
    (password,) = conn.execute("SELECT password FROM account_user LIMIT 1").fetchone()

    def triggers(on: bool):
        for table, name in TRIGGERS:
            conn.execute(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER {name}")

    def updates(n):
        started = time.perf_counter()
        for _ in range(n):
            conn.execute(
                "UPDATE account_user SET full_name = md5(random()::text) WHERE id = %s",
                [rng.randrange(1, top)],
            )
        return (time.perf_counter() - started) / n

    def inserts(n):
        started = time.perf_counter()
        for _ in range(n):
            name = f"bench{rng.randrange(10**12)}"
            conn.execute(
                "INSERT INTO account_user (password, is_superuser, username, email, full_name, "
                "phone_number, is_active, is_staff) VALUES (%s, false, %s, %s, 'B', "
                "'9841234567', true, false)",
                [password, name, f"{name}@example.com"],
            )
        return (time.perf_counter() - started) / n

    def bulk():
        with conn.transaction():
            started = time.perf_counter()
            conn.execute("UPDATE account_user SET full_name = 'Bulk' || id WHERE id % 100 = 99")
            return time.perf_counter() - started

    out = {k: [] for k in ("update on", "update off", "insert on", "insert off")}
    out.update({"bulk on": [], "bulk off": []})
    try:
        block = max(writes // 10, 1)
        for _ in range(10):  # alternating blocks: both see the same server, cache and load
            for on in (True, False):
                triggers(on)
                key = "on" if on else "off"
                out[f"update {key}"].append(updates(block))
                out[f"insert {key}"].append(inserts(block))
        for on in (True, False, True, False):
            triggers(on)
            out[f"bulk {'on' if on else 'off'}"].append(bulk())
    finally:
        triggers(True)
        # The writes made without the triggers are not in the log: compare every user next.
        conn.execute(
            "INSERT INTO account_changelog (side, user_id, op, at) "
            "VALUES ('legacy', 0, 'full', now())"
        )
        conn.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--writes", type=int, default=2000)
    args = parser.parse_args()
    setup_django()
    from account.models import User

    n = User.objects.count()
    print(f"Change log benchmark: {n:,} legacy users, PostgreSQL, {os.cpu_count()} cores")
    syncs = resyncs(args.runs)
    print("  re-syncs (copy_users, in process; median of runs, seconds):")
    for key, values in syncs.items():
        print(
            f"    {key:<16} {median(values):8.3f}   runs: {', '.join(f'{v:.3f}' for v in values)}"
        )
    for what in ("nothing", "1%"):
        log, full = median(syncs[f"{what}, log"]), median(syncs[f"{what}, full"])
        print(f"    {what} changed: log {log:.3f} s, full compare {full:.3f} s ({full / log:.0f}x)")
    w = writers(args.writes)
    print("  writers (median per write, autocommit, triggers on vs off):")
    for kind in ("update", "insert"):
        on, off = median(w[f"{kind} on"]) * 1e6, median(w[f"{kind} off"]) * 1e6
        print(f"    single-row {kind:<6} {on:8.0f} us with, {off:8.0f} us without: "
              f"+{on - off:.0f} us, {on / off:.2f}x")  # fmt: skip
    on, off = median(w["bulk on"]), median(w["bulk off"])
    rows = n // 100
    print(f"    one UPDATE of {rows:,} rows: {on:.3f} s with, {off:.3f} s without: "
          f"+{(on - off) / rows * 1e6:.0f} us a row, {on / off:.2f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
