#!/usr/bin/env python
"""Time each step of one first copy, in a transaction that is rolled back.

Usage: bench/sync_steps.py [--set NAME=VALUE ...]

Runs on BENCH_DATABASE_URL, like the other benchmarks (default
postgres://postgres@127.0.0.1:5432/accounts_bench), which must hold legacy users and no copy
yet, as `make bench-migrate N=...` leaves it (not dropped here). It runs VACUUM (ANALYZE) first,
as the bench does after loading, and a CHECKPOINT, as the bench does before each step
(CHECKPOINT needs a superuser, or pg_checkpoint on PostgreSQL 15 and later). Then the copy runs
as migration 0002 runs it (REPEATABLE READ, USER_COPY_SKIP_INVALID, the report in REPORT_DIR),
but with the current models and in a savepoint of this script's transaction, as the cut-over
runs it; every step of `account.usercopy.Sync` is timed, and the transaction is rolled back.
Nothing stays written but the id sequences, which PostgreSQL never rolls back. It prints the WAL
the server wrote during the copy and the checkpoints started meanwhile (any cause).

--set overrides a PostgreSQL setting for the copy, after the sync and the index builds have
set their own (e.g. --set work_mem=256MB); temp_buffers is set before the session's first
temporary table.
"""

import argparse
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

from common import checkpoint, setup_django, wal_and_checkpoints

STEPS = (
    "plan", "removed_users", "find_collisions", "check_rows", "load_values", "delete_removed",
    "write_rows", "create_profiles", "advance_sequences", "verify", "record",
)  # fmt: skip
INSIDE = {"load_values": "check_rows"}  # timed within another step: not added to the total


class Rollback(Exception):
    pass


def check_settings(settings) -> None:
    """Try each --set in a transaction of its own; exit naming the first one refused."""
    from django.db import DatabaseError, connection, transaction

    for name, value in settings:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT set_config(%s, %s, true)", [name, value])
        except DatabaseError as exc:
            sys.exit(f"--set {name}={value}: {str(exc).splitlines()[0]}")


def run(settings) -> None:
    from django.apps import apps
    from django.conf import settings as django_settings
    from django.db import connection, transaction

    from account import usercopy

    times: dict[str, float] = defaultdict(float)

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - started

        return wrapper

    def apply_settings():
        with connection.cursor() as cursor:
            for name, value in settings:
                if name != "temp_buffers":
                    cursor.execute("SELECT set_config(%s, %s, true)", [name, value])

    def override(function):
        def wrapper(*args, **kwargs):
            saved = function(*args, **kwargs)
            apply_settings()
            return saved

        return wrapper

    for name in STEPS:
        setattr(usercopy.Sync, name, timed(name, getattr(usercopy.Sync, name)))
    usercopy.Sync.tune = override(usercopy.Sync.tune)
    usercopy.analyze = timed("analyze", usercopy.analyze)
    build_after = usercopy.indexes_built_after

    @contextmanager
    def indexes_built_after(*args, **kwargs):
        with build_after(*args, **kwargs):
            apply_settings()  # it sets maintenance_work_mem for the index builds
            yield
            started = time.perf_counter()  # the indexes and constraints are built as it ends
        times["index builds"] += time.perf_counter() - started

    usercopy.indexes_built_after = indexes_built_after

    models = usercopy.CopyModels.from_apps(apps)
    if models.new.objects.exists():
        sys.exit("NewUser already holds users: run this before the copy (migrate account 0001).")
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")
        checkpoint(cursor)
        before = wal_and_checkpoints(cursor)
    started = time.perf_counter()
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for name, value in settings:
                if name == "temp_buffers":
                    cursor.execute("SELECT set_config('temp_buffers', %s, false)", [value])
            try:
                result = usercopy.copy_users(
                    models,
                    skip_invalid=django_settings.USER_COPY_SKIP_INVALID,
                    report_dir=django_settings.REPORT_DIR,
                )
            except usercopy.CopyError as exc:
                sys.exit(f"The copy refused: {exc}")
            total = time.perf_counter() - started
            raise Rollback
    except Rollback:
        pass
    with connection.cursor() as cursor:
        after = wal_and_checkpoints(cursor)
    wal_bytes, checkpoints = (b - a for a, b in zip(before, after, strict=True))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if models.new.objects.exists():
        sys.exit("NewUser holds users after the rollback: this run wrote something.")
    print(f"{result.lines()[0]}\nrolled back, NewUser empty again; in all {total:.1f} s, "
          f"peak RSS {rss:.0f} MB; {wal_bytes / 2**20:,.0f} MiB of WAL and {checkpoints} checkpoints "
          f"meanwhile (server-wide)")  # fmt: skip
    for name in (*STEPS, "analyze", "index builds"):
        if name in times:
            inside = f" (within {INSIDE[name]})" if name in INSIDE else ""
            print(f"  {name:<20} {times[name]:7.1f} s{inside}")
    counted = sum(v for k, v in times.items() if k not in INSIDE)
    print(f"  {'other':<20} {total - counted:7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    settings = [item.split("=", 1) for item in parser.parse_args().set]
    if any(len(item) != 2 for item in settings):
        sys.exit("--set takes NAME=VALUE, e.g. --set work_mem=256MB")
    setup_django()
    from django.db import DatabaseError

    try:
        check_settings(settings)
        run(settings)
    except DatabaseError as exc:
        sys.exit(f"The database refused: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main()
