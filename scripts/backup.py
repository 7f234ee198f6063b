#!/usr/bin/env python
"""Back up the account tables to JSON Lines.

Usage: scripts/backup.py [--dir DIR] [--output FILE] [--no-gzip] [-v {0,1,2}]

A thin entry point over `manage.py backup_accounts` (account/backup.py holds the code), used
by `make backup` and `make migrate-data`. Restore with scripts/restore.py FILE.
Every failure (configuration, database down, never migrated, directory not writable) ends in
one line and exit status 1. `-v 2` prints a progress line per tenth of the rows.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["scripts/backup.py", "backup_accounts", *sys.argv[1:]])
