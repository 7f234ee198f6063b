#!/usr/bin/env python
"""Benchmark populate_fake_user_bulk on PostgreSQL against the straightforward approach.

Usage: bench/bench_populate.py [N]     (make bench-populate N=1000000; default 1,000,000)

Prints wall seconds, users/s and peak RSS for N users and for N/10 (memory must stay flat),
and, in the same run, five Faker calls per user + bulk_create on a sample, as a ratio.
"""

import sys

from common import manage, measure, recreate_database, report

STRAIGHTFORWARD = """
import os, sys, time, django
django.setup()
from django.contrib.auth.hashers import make_password
from faker import Faker
from account.models import User
n = int(sys.argv[1]); fake = Faker(); password = make_password("legacy-password")
started = time.perf_counter()
users = [User(username=f"{fake.user_name()}{i}", email=fake.email(), full_name=fake.name(),
              date_of_birth=fake.date_of_birth(minimum_age=18, maximum_age=90),
              phone_number=fake.phone_number()[:15], password=password) for i in range(n)]
User.objects.bulk_create(users, batch_size=2000)
print(time.perf_counter() - started)
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    sample = min(n, 20_000)
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0")
    small = manage(
        f"@{n // 10} populate_fake_user_bulk N/10", "populate_fake_user_bulk", str(n // 10)
    )
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0")
    full = manage(f"@{n} populate_fake_user_bulk N", "populate_fake_user_bulk", str(n))
    recreate_database()
    manage("migrate", "migrate", "account", "0001", "-v0")
    simple = measure(
        f"@{sample} Faker x5 per user + bulk_create (sample)", ["-c", STRAIGHTFORWARD, str(sample)]
    )
    report("populate_fake_user_bulk", n, [small, full, simple])
    ours = n / full.seconds
    theirs = sample / float(simple.output.strip().splitlines()[-1])  # its own timer, no start-up
    print(
        f"\n  populate: {ours:,.0f} users/s; straightforward: {theirs:,.0f} users/s; "
        f"ratio {ours / theirs:.1f}x; projected straightforward time for N: {n / theirs:.0f} s"
    )
    print(f"  peak RSS: {small.rss_mb:.0f} MB at N/10, {full.rss_mb:.0f} MB at N")


if __name__ == "__main__":
    main()
