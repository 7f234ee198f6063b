"""Helpers for the benchmark scripts: a scratch PostgreSQL database and measured subprocesses.

Every measured step runs as its own process, so its wall time and peak RSS (from wait4)
are its own. The scratch database is BENCH_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/accounts_bench; it is dropped and created again.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/accounts_bench"
)


@dataclass
class Measured:
    label: str
    seconds: float
    rss_mb: float
    output: str = ""
    wal_mb: float | None = None  # WAL written while it ran (server-wide), when measured
    checkpoints: int | None = None  # checkpoints started while it ran (any cause)
    write_back: float | None = None  # seconds of a CHECKPOINT right after it (not in seconds)


def recreate_database(url: str = BENCH_URL) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def env(**extra) -> dict:
    return {
        **os.environ,
        "DATABASE_URL": BENCH_URL,
        "DEBUG": "on",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        **{k: str(v) for k, v in extra.items()},
    }


def measure(label: str, args: list[str], **extra) -> Measured:
    """Run `python ARGS` from the project root; fail loudly if it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env(**extra),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{label} failed:\n{output}")
    return Measured(label, seconds, usage.ru_maxrss / 1024, output)


def manage(label: str, *args: str, **extra) -> Measured:
    return measure(label, ["manage.py", *args], **extra)


def wal_and_checkpoints(cursor) -> tuple[int, int]:
    """WAL inserted so far (bytes) and checkpoints started so far (timed or requested, by WAL
    volume or by anyone's CHECKPOINT), server-wide."""
    counters = (
        "(SELECT num_timed + num_requested FROM pg_stat_checkpointer)"
        if cursor.db.pg_version >= 170000
        else "(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)"
    )
    cursor.execute(
        f"SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, {counters}"
    )
    return cursor.fetchone()


def checkpoint(cursor) -> None:
    """CHECKPOINT, then wait until the statistics count it (the checkpointer may answer before
    it reports), so that it is not counted in the next step."""
    _, before = wal_and_checkpoints(cursor)
    cursor.execute("CHECKPOINT")
    for _ in range(100):
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        if wal_and_checkpoints(cursor)[1] > before:
            return
        time.sleep(0.05)


def on_clean_server(step):
    """Run `step()` (returning a Measured) between two CHECKPOINTs and add what it wrote.

    The CHECKPOINT before makes every step start with nothing dirty, so none pays for writing
    back what the step before it left. The one after is timed as the step's write-back: the
    dirty pages it left, which a live server writes back later; it is reported, not added to
    the step's time. Also added: the WAL the server inserted while the step ran and the
    checkpoints started meanwhile (any cause; the ones the bench runs are not counted).
    Needs Django set up on the bench database (setup_django) and a role allowed to run
    CHECKPOINT (a superuser, or pg_checkpoint on PostgreSQL 15 and later).
    """
    from django.db import connection

    with connection.cursor() as cursor:
        checkpoint(cursor)
        wal, checkpoints = wal_and_checkpoints(cursor)
    measured = step()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        wal_after, checkpoints_after = wal_and_checkpoints(cursor)
        started = time.perf_counter()
        checkpoint(cursor)
        measured.write_back = time.perf_counter() - started
    measured.wal_mb = (wal_after - wal) / 2**20
    measured.checkpoints = checkpoints_after - checkpoints
    return measured


def setup_django() -> None:
    os.environ.update(env())
    import django

    django.setup()


def report(title: str, n: int, rows: list[Measured], per: str = "users") -> None:
    print(f"\n{title} (N = {n:,}, PostgreSQL, {os.cpu_count()} cores)")
    wal = any(m.wal_mb is not None for m in rows)
    print(f"  {'step':<52} {'seconds':>8} {per + '/s':>12} {'peak RSS MB':>12}"
          + (f" {'WAL MiB':>8} {'ckpts':>6} {'write-back s':>12}" if wal else ""))  # fmt: skip
    for m in rows:
        count = n if not m.label.startswith("@") else int(m.label[1:].split()[0])
        label = m.label.split(" ", 1)[1] if m.label.startswith("@") else m.label
        rate = f"{count / m.seconds:,.0f}" if m.seconds else "-"
        rss = f"{m.rss_mb:.0f}" if m.rss_mb else "-"
        line = f"  {label:<52} {m.seconds:>8.1f} {rate:>12} {rss:>12}"
        if m.wal_mb is not None:
            line += f" {m.wal_mb:>8,.0f} {m.checkpoints:>6} {m.write_back:>12.1f}"
        print(line)
