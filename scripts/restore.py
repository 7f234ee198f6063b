#!/usr/bin/env python
"""Restore the account tables from a backup made by scripts/backup.py.

Usage: scripts/restore.py FILE [--replace] [--dry-run] [--accept-unkeyed] [-v {0,1,2}]

A thin entry point over `manage.py restore_accounts`, used by `make restore FILE=...`.
The file and this database are checked before anything is written; `--dry-run` reports what
a restore would do (exit status 0 when it would go ahead, 1 when it would refuse or the file
is damaged). Every refusal is one line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["scripts/restore.py", "restore_accounts", *sys.argv[1:]])
