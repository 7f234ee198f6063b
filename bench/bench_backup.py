#!/usr/bin/env python
"""Benchmark backup and restore on PostgreSQL against dumpdata and the COPY limit.

Usage: bench/bench_backup.py [N]      (make bench-backup N=1000000; default 1,000,000)

N legacy users (the state `make migrate-data` backs up). Each step in its own process:
backup and restore at N/10 and N (memory must stay flat), Django's `dumpdata account.User`
on the same table, and `COPY (SELECT row_to_json ...) TO STDOUT` as the physical limit.
"""

import sys
import tempfile
import time
from pathlib import Path

from common import Measured, manage, measure, recreate_database, report, setup_django


def wipe() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE account_user, account_user_groups, account_user_user_permissions")


def copy_limit() -> float:
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:
        sql = "COPY (SELECT row_to_json(u) FROM account_user u ORDER BY id) TO STDOUT"
        with cursor.cursor.copy(sql) as copy:
            for _ in copy:
                pass
    return time.perf_counter() - started


def round_trip(n: int, directory: Path) -> tuple[Measured, Measured, Path]:
    target = directory / f"bench-{n}.jsonl.gz"
    backup = measure(f"@{n} scripts/backup.py", ["scripts/backup.py", "--output", str(target)])
    wipe()
    restore = measure(
        f"@{n} scripts/restore.py (into empty tables)", ["scripts/restore.py", str(target)]
    )
    return backup, restore, target


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    directory = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0")
    manage("populate", "populate_fake_user_bulk", str(n // 10), "-v0")
    setup_django()
    small_backup, small_restore, _ = round_trip(n // 10, directory)
    manage("populate", "populate_fake_user_bulk", str(n - n // 10), "-v0")
    backup, restore, target = round_trip(n, directory)
    # dumpdata queries the groups and permissions of each user: ~350 users/s, so a sample.
    sample = min(n, 20_000)
    pks = ",".join(map(str, range(1, sample + 1)))
    dumpdata = manage(f"@{sample} manage.py dumpdata account.User (sample)", "dumpdata",
                      "account.User", "--pks", pks, "--output", str(directory / "dumpdata.json"))  # fmt: skip
    limit = Measured(f"@{n} COPY row_to_json TO STDOUT (limit)", copy_limit(), 0)
    report("Backup and restore of legacy users", n,
           [small_backup, small_restore, backup, restore, dumpdata, limit], per="rows")  # fmt: skip
    dumpdata_n = dumpdata.seconds * n / sample  # projected from the sample's rate
    print(
        f"\n  dumpdata projected for N: {dumpdata_n:.0f} s; backup {dumpdata_n / backup.seconds:.0f}x "
        f"faster; {backup.seconds / limit.seconds:.1f}x the COPY limit; file "
        f"{target.stat().st_size / 1e6:.0f} MB"
    )
    print(
        f"  peak RSS: backup {small_backup.rss_mb:.0f} -> {backup.rss_mb:.0f} MB, "
        f"restore {small_restore.rss_mb:.0f} -> {restore.rss_mb:.0f} MB (N/10 -> N)"
    )


if __name__ == "__main__":
    main()
