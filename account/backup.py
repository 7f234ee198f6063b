"""Back up the account tables to JSON Lines and restore them: streaming, checksummed, verified.

File format (version 1), optionally gzip-compressed (`.jsonl.gz`):

    line 1:  the manifest: {"format": "account-backup", "version": 1, "created_at": ...,
             "migrations": {app: [applied migration names]}, "tables": {table: {"columns":
             [...], "rows": N}}, "sha256": hex digest of every line after this one}
    then:    one line per row, table after table: {"t": "account_user", "r": {column: value}}

The data lines are written to a temporary file first (hashing them on the way), then the
manifest and the data are written under a temporary name that is renamed to the final,
timestamped name only when complete: a killed backup leaves no file under a final name.
Restore checks the manifest and the checksum before it writes anything, then loads every
table in one transaction and compares the row counts before committing.
"""

import gzip
import hashlib
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path

import orjson
from django.contrib.auth.models import Group
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.db.migrations.recorder import MigrationRecorder

from .dbutil import indexes_built_after, insert_rows, reset_sequences
from .models import Activity, Address, NewUser, Notification, OperationLog, Profile, User

FORMAT = "account-backup"
VERSION = 1
APPS = ("account", "auth")
GZIP_MAGIC = b"\x1f\x8b"


def backed_up_models() -> list:
    """Every table a backup holds, in an order that restores without foreign key errors."""
    through = [m._meta.get_field(n).remote_field.through for m in (User, NewUser)
               for n in ("groups", "user_permissions")]  # fmt: skip
    return [
        Group,
        Group.permissions.through,
        User,
        through[0],
        through[1],
        NewUser,
        through[2],
        through[3],
        Profile,
        Address,
        Activity,
        Notification,
    ]


def columns(model) -> list[str]:
    return [f.attname for f in model._meta.concrete_fields]


class BackupError(CommandError):
    """The backup or restore refused or failed; the message says why and what to do."""


@dataclass
class Outcome:
    path: Path
    rows: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def log(self, kind: str, started_at) -> None:
        """Record the run for the status page: counts and the file name, no personal data."""
        OperationLog.objects.create(
            kind=kind,
            ok=True,
            started_at=started_at,
            summary={"rows": self.rows, "file": self.path.name, "seconds": self.seconds},
            message=f"{self.total} rows, {self.path.name}",
        )

    def line(self, verb: str) -> str:
        size = self.path.stat().st_size if self.path.exists() else 0
        return (
            f"{verb} {self.total} rows from {len(self.rows)} tables in {self.seconds:.1f} s "
            f"({self.total / max(self.seconds, 1e-9):,.0f} rows/s), {self.path} "
            f"({size / 1e6:.1f} MB)."
        )


def applied_migrations() -> dict[str, list[str]]:
    recorder = MigrationRecorder(connection)
    applied = sorted(recorder.applied_migrations())
    return {app: [name for a, name in applied if a == app] for app in APPS}


# --- backup ---------------------------------------------------------------------------------


def _rows_postgresql(model, out, digest) -> int:
    """Let PostgreSQL write the JSON (COPY ... TO STDOUT): the fastest path, memory flat."""
    qn = connection.ops.quote_name
    table = model._meta.db_table
    cols = ", ".join(qn(c) for c in columns(model))
    # CSV with a quote and a delimiter that JSON never contains: each line is the JSON as is.
    sql = (
        f"COPY (SELECT json_build_object('t', %s, 'r', row_to_json(x)) FROM "
        f"(SELECT {cols} FROM {qn(table)} ORDER BY {qn(model._meta.pk.column)}) x) "
        "TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    )
    n = 0
    with connection.cursor() as cursor, cursor.cursor.copy(sql, [table]) as copy:
        for chunk in copy:
            data = bytes(chunk)
            digest.update(data)
            out.write(data)
            n += data.count(b"\n")
    return n


def _rows_orm(model, out, digest, chunk_size=5000) -> int:
    table = model._meta.db_table
    cols = columns(model)
    n = 0
    rows = model.objects.order_by("pk").values_list(*cols).iterator(chunk_size=chunk_size)
    for values in rows:
        line = orjson.dumps({"t": table, "r": dict(zip(cols, values, strict=True))}, default=str)
        line += b"\n"
        digest.update(line)
        out.write(line)
        n += 1
    return n


def _open_out(path: Path, compress: bool):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    raw = open(fd, "wb")  # noqa: SIM115
    return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) if compress else raw, raw


def backup(*, directory, output=None, compress: bool = True, on_progress=None) -> Outcome:
    """Write every account table to a new backup file; returns what it wrote.

    The file is `directory/accounts-<UTC timestamp>.jsonl[.gz]` unless `output` names one;
    an existing file is never overwritten.
    """
    started = time.perf_counter()
    if output:
        final = Path(output)
        compress = final.suffix == ".gz"
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
        final = Path(directory) / f"accounts-{stamp}.jsonl{'.gz' if compress else ''}"
    if final.exists():
        raise BackupError(f"{final} already exists; a backup never overwrites a file.")
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    data_tmp = directory / f".{final.name}.data.partial"
    full_tmp = directory / f".{final.name}.partial"
    outcome = Outcome(path=final)
    digest = hashlib.sha256()
    write_rows = _rows_postgresql if connection.vendor == "postgresql" else _rows_orm
    try:
        # One snapshot for every table, so links and users agree.
        nested = connection.in_atomic_block
        with transaction.atomic():
            if connection.vendor == "postgresql" and not nested:
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            migrations = applied_migrations()
            out, raw = _open_out(data_tmp, compress)
            with raw, out:
                for model in backed_up_models():
                    n = write_rows(model, out, digest)
                    outcome.rows[model._meta.db_table] = n
                    if on_progress:
                        on_progress(n)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "database": connection.vendor,
            "migrations": migrations,
            "tables": {
                m._meta.db_table: {"columns": columns(m), "rows": outcome.rows[m._meta.db_table]}
                for m in backed_up_models()
            },
            "sha256": digest.hexdigest(),
        }
        # The manifest first, then the data as it is (gzip members may be concatenated).
        head, raw = _open_out(full_tmp, compress)
        with raw:
            head.write(orjson.dumps(manifest) + b"\n")
            if head is not raw:
                head.close()  # ends the manifest's gzip member; `raw` stays open
            with open(data_tmp, "rb") as data:
                shutil.copyfileobj(data, raw, 1 << 20)
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.link(full_tmp, final)  # never overwrites: fails if the name exists
        except FileExistsError:
            raise BackupError(
                f"{final} already exists; a backup never overwrites a file."
            ) from None
    finally:
        for tmp in (data_tmp, full_tmp):
            tmp.unlink(missing_ok=True)
    outcome.seconds = time.perf_counter() - started
    return outcome


# --- restore --------------------------------------------------------------------------------


def _open_in(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")  # noqa: SIM115


def _data_lines(f, chunk_size=1 << 20):
    """The lines after the manifest, read in large chunks (much faster than readline on gzip)."""
    f.readline()
    rest = b""
    while chunk := f.read(chunk_size):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def read_manifest(path) -> dict:
    """The manifest of a backup file, checked against what this version of the app can read."""
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"No backup file at {path}.")
    try:
        with _open_in(path) as f:
            first = f.readline()
        manifest = orjson.loads(first)
    except (OSError, EOFError, zlib.error, orjson.JSONDecodeError):
        raise BackupError(
            f"{path} is not a readable account backup (its first line is not a manifest)."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not an account backup made by this app.")
    if manifest.get("version") != VERSION:
        raise BackupError(
            f"{path} is backup format version {manifest.get('version')!r}; this app reads "
            f"version {VERSION} only."
        )
    return manifest


def verify_file(path, manifest) -> dict:
    """Hash every data line and compare with the manifest; refuse a corrupted or truncated file.

    Returns the row count of each table. (After loading, the counts are checked again.)
    """
    digest = hashlib.sha256()
    try:
        with _open_in(path) as f:
            f.readline()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        raise BackupError(f"{path} is corrupted or truncated; nothing was restored.") from None
    if digest.hexdigest() != manifest.get("sha256"):
        raise BackupError(
            f"{path} does not match its checksum (corrupted or truncated); nothing was restored."
        )
    return {t: spec["rows"] for t, spec in manifest["tables"].items()}


def _check_target(manifest, replace):
    models = {m._meta.db_table: m for m in backed_up_models()}
    unknown = set(manifest["tables"]) - set(models)
    if unknown:
        raise BackupError(f"The backup holds tables this app does not have: {sorted(unknown)}.")
    for table, spec in manifest["tables"].items():
        if spec["columns"] != columns(models[table]):
            raise BackupError(
                f"The columns of {table} in the backup differ from this database's; "
                "restore with the version of the app that made it."
            )
    here = applied_migrations()
    if here.get("account") != manifest["migrations"].get("account"):
        raise BackupError(
            "The backup was made at account migrations "
            f"{manifest['migrations'].get('account')}, this database is at {here.get('account')}: "
            "migrate this database to the same point first (python manage.py migrate account "
            "NAME), then restore."
        )
    if not replace:
        busy = [t for t in manifest["tables"] if models[t].objects.exists()]
        if busy:
            raise BackupError(
                f"These tables already hold rows: {', '.join(busy)}. Restore into empty "
                "tables, or pass --replace to delete their rows first (in the same transaction)."
            )


def _counted(rows, on_progress, every=10_000):
    """Pass rows through, reporting progress every `every` rows."""
    n = 0
    for n, row in enumerate(rows, 1):  # noqa: B007 (n is used after the loop)
        yield row
        if on_progress and n % every == 0:
            on_progress(every)
    if on_progress:
        on_progress(n % every)


def restore(path, *, replace=False, dry_run=False, on_progress=None) -> Outcome:
    """Check a backup, then load it in one transaction; returns the rows per table."""
    started = time.perf_counter()
    path = Path(path)
    manifest = read_manifest(path)
    expected = verify_file(path, manifest)
    _check_target(manifest, replace)
    outcome = Outcome(path=path, rows=dict(expected))
    if dry_run:
        outcome.seconds = time.perf_counter() - started
        return outcome
    models = {m._meta.db_table: m for m in backed_up_models()}
    with transaction.atomic():
        # Load into bare tables, then build indexes and constraints once (and check them).
        with indexes_built_after(models.values()):
            if replace:
                with connection.cursor() as cursor:
                    for model in reversed(backed_up_models()):
                        cursor.execute(
                            f"DELETE FROM {connection.ops.quote_name(model._meta.db_table)}"
                        )
            with _open_in(path) as f:
                records = (orjson.loads(line) for line in _data_lines(f))
                # Lines come table after table: one streamed COPY (or bulk_create) per table.
                for table, group in groupby(records, key=itemgetter("t")):
                    cols = manifest["tables"][table]["columns"]
                    first = next(group)
                    if list(first["r"]) != cols:
                        raise BackupError(f"{path}: the rows of {table} do not match its columns.")
                    # Rows are written with their columns in the manifest's order.
                    rows = (tuple(record["r"].values()) for record in chain([first], group))
                    insert_rows(models[table], cols, _counted(rows, on_progress))
        reset_sequences(list(models.values()))
        for name, n in expected.items():
            if models[name].objects.count() != n:
                raise BackupError(f"After restoring, {name} does not hold {n} rows; rolled back.")
    outcome.seconds = time.perf_counter() - started
    return outcome
