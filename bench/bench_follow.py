#!/usr/bin/env python
"""Benchmark the follower's lag: legacy writes at a steady rate, carried by `--follow`.

Usage: bench/bench_follow.py N [--rate 200] [--seconds 30]

Recreates BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/accounts_bench):
N legacy users (`populate_fake_user_bulk`), migrated and copied (migration 0002). Then the
follower (`account.follower.follow`, the code behind `copy_users --follow`) runs in a thread
of this process while a writer on its own connection commits RATE single-row legacy updates a
second (autocommit, random users) for SECONDS.

The lag of a write is measured from its commit to the commit of the first sync that started
after it (so it surely saw it): an upper bound, since a sync that started a little before the
write's commit may have carried it too. Printed: p50, p99 and max of the lag, the syncs and
how many writes each carried, and whether NewUser ended level with the legacy table; then
the same for the simplest alternative, a log-driven `copy_users` once a second (cron-like),
and the ratio of their median lags.
"""

import argparse
import bisect
import random
import statistics
import sys
import threading
import time

from common import BENCH_URL, manage, recreate_database, setup_django


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    recreate_database()
    manage("populate", "populate_fake_user_bulk", str(args.n), "--migrate", "-v", "0")
    manage("migrate", "migrate", "--no-input", "-v", "0")
    setup_django()

    from django.conf import settings
    from django.db import connection

    from account.follower import follow
    from account.management.commands.copy_users import MODELS
    from account.usercopy import copy_users

    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id), max(id) FROM account_user")
        low, high = cursor.fetchone()

    def follower(stop, on_sync, ready):
        follow(
            MODELS, skip_invalid=True, batch_size=5000, report_dir=settings.REPORT_DIR,
            stop=stop, on_sync=on_sync, on_ready=ready.set,
        )  # fmt: skip

    def every_second(stop, on_sync, ready):
        """The simplest alternative: a log-driven `copy_users` once a second (cron-like)."""
        ready.set()
        while not stop.wait(1.0):
            on_sync(copy_users(MODELS, skip_invalid=True, report_dir=settings.REPORT_DIR))

    print(f"\nFollower lag (N = {args.n:,}, PostgreSQL, {args.rate:.0f} legacy writes/s "
          f"for {args.seconds:.0f} s each, lag = write commit to the commit of the first sync "
          "started after it)")  # fmt: skip
    figures = {}
    for label, how in (("copy_users --follow", follower), ("copy_users every 1 s", every_second)):
        figures[label] = phase(how, args, low, high, connection)
        lags, achieved, written, differ = figures[label]
        p = lambda q, lags=lags: lags[min(len(lags) - 1, int(q * len(lags)))]  # noqa: E731
        print(f"  {label:<22} p50 {p(0.50) * 1000:6.0f} ms  p99 {p(0.99) * 1000:6.0f} ms  "
              f"max {lags[-1] * 1000:6.0f} ms  ({achieved:.0f} writes/s achieved, "
              f"{len(written)} syncs that wrote, median {statistics.median(written):.0f} users "
              f"each; users differing afterwards: {differ})")  # fmt: skip
    f, c = (statistics.median(figures[k][0]) for k in figures)
    print(f"  median lag ratio, every 1 s / follower: {c / f:.1f}x (goal: the follower within 1 s)")


def phase(how, args, low, high, connection):
    import psycopg

    syncs = []  # (started, committed, users written), in the order they committed
    stop, ready = threading.Event(), threading.Event()

    def on_sync(result):
        now = time.time()
        syncs.append((now - result.seconds, now, result.written))

    def run():
        try:
            how(stop, on_sync, ready)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    if not ready.wait(600):
        sys.exit("the follower did not start")
    commits = []
    rng = random.Random(7)
    with psycopg.connect(BENCH_URL, autocommit=True) as conn:
        interval = 1 / args.rate
        start = time.perf_counter()
        for i in range(int(args.rate * args.seconds)):
            pause = start + i * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            conn.execute(
                "UPDATE account_user SET full_name = %s WHERE id = %s",
                [f"Lag {i} {how.__name__}", rng.randint(low, high)],
            )
            commits.append(time.time())
        achieved = len(commits) / (time.perf_counter() - start)
        time.sleep(3)
        stop.set()
        thread.join()
        differ = conn.execute(
            "SELECT COUNT(*) FROM account_user l JOIN account_newuser n ON n.id = l.id "
            "WHERE l.full_name IS DISTINCT FROM n.full_name"
        ).fetchone()[0]
    starts = [s for s, _, _ in syncs]
    lags = sorted(
        syncs[j][1] - t for t in commits if (j := bisect.bisect_right(starts, t)) < len(syncs)
    )
    return lags, achieved, [w for _, _, w in syncs if w] or [0], differ


if __name__ == "__main__":
    main()
