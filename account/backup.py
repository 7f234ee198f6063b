"""Back up the account tables to JSON Lines and restore them: streaming, keyed, verified.

File format (version 4), optionally gzip-compressed (`.jsonl.gz`):

    line 1:  the manifest: {"format": "account-backup", "version": 4, "created_at": ...,
             "user_model": AUTH_USER_MODEL, "migrations": {app: [applied migration names]},
             "tables": {table: {"columns": [...], "rows": N}},
             "natural_keys": {"auth.permission": [[app_label, model, codename], ...],
                              "contenttypes.contenttype": [[app_label, model], ...],
                              "auth.group": [[name], ...]},
             "sha256": hex digest of every line after this one,
             "hmac": HMAC-SHA256, keyed with settings.BACKUP_KEY (SECRET_KEY when unset), of
                     this manifest without "hmac" and "manifest_sha256" (compact JSON, keys
                     sorted, as `manifest_hmac` writes it): the rows' sha256 with it,
             "manifest_sha256": hex digest of this manifest without this field, "hmac"
                                included (keys sorted, as `manifest_digest` writes it)}
    then:    one line per row, table after table: {"t": "account_user", "r": {column: value}}

The sha256 digests catch a damaged file; only the HMAC proves that the file is the one a backup
made with this key wrote: anyone can recompute a digest after changing a row. So a restore
refuses a file whose HMAC does not match (made with another key, or changed since), whatever
it is told, and a file without one: versions 2 (no `manifest_sha256`; the digest covers the
rows only) and 3 (no `hmac`) are restored only when the caller accepts an unkeyed file
(`accept_unkeyed`, restore_accounts --accept-unkeyed), since nothing proves who wrote them. A
version 4 manifest without its HMAC is refused outright: the app always writes one. The key
is never written into the file, nor into any message.

Ids that differ from one database to the next are never written. Permission and content type
ids depend on the order apps were migrated in, so a link to a permission holds its natural key,
`"permission_key": ["account", "newuser", "view_newuser"]`, an admin log entry holds
`"content_type_key": ["account", "newuser"]`, and groups are rows `{"name": "editors"}` that
links name as `"group_key": ["editors"]` (Django's `natural_key()`, as `dumpdata
--natural-foreign` writes them). Link rows carry no id of their own: nothing refers to it.
Users and the rows hanging off them keep their ids: sessions and other tables hold them.

Backup: one repeatable-read snapshot; the rows go to an unnamed temporary file (hashed on the
way), then the manifest and the rows to `.NAME.partial` (mode 0600, locked while written), which
is linked to the final, timestamped name only when complete; the directory is then fsynced. A
killed backup leaves only its `.partial` file, which the next backup into that directory removes
(a partial file still locked belongs to a backup that is running and is left alone).

Restore: checks the manifest (its checksum, its HMAC, its shape), the rows' checksum and this database
(migrations, columns, every permission and content type the file names, rows in the way,
other tables pointing at the rows it would delete, the database role's rights) before it
writes anything, then loads every table in one transaction: groups are matched by name
(created when missing, their permissions replaced), every other table is emptied (--replace)
and loaded, and the row counts are compared before committing. A row that is not what the
manifest describes, or that the database rejects, rolls the whole restore back.
"""

import fcntl
import gzip
import hashlib
import hmac
import os
import re
import shutil
import tempfile
import time
import zlib
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import orjson
from django.apps import apps
from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import DatabaseError, Error, OperationalError, connection, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.db.models import Case, When
from django.db.models.functions import JSONArray

from . import catalog, readonly
from .dbutil import indexes_built_after, insert_rows, reset_sequences
from .models import (
    Activity,
    Address,
    NewUser,
    Notification,
    OperationLog,
    Profile,
    SyncState,
    User,
)
from .progress import progress

FORMAT = "account-backup"
VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
# Without an HMAC (2: without manifest_sha256 either): read only when the caller accepts them.
UNKEYED_VERSIONS = (2, 3)
APPS = ("account", "auth", "admin")
GZIP_MAGIC = b"\x1f\x8b"
# The partial files a backup writes (and `.NAME.data.partial`, from format 1).
PARTIAL = re.compile(r"^\..+\.jsonl(\.gz)?(\.data)?\.partial$")

# Models stored by natural key (the lookups of Django's `natural_key()`), not by id.
NATURAL_KEYS = {
    Permission: ("content_type__app_label", "content_type__model", "codename"),
    ContentType: ("app_label", "model"),
    Group: ("name",),
}


class BackupError(Exception):
    """The backup or restore refused or failed; the message says why and what to do."""


class Table:
    """One table of a backup: which columns it writes, and how they map back to a database.

    A foreign key to a model in NATURAL_KEYS is written as `<field>_key` holding the related
    row's natural key. The id of a link (many-to-many) row or of a group is not written.
    """

    def __init__(self, model):
        self.model = model
        self.name = model._meta.db_table
        self.label = model._meta.label_lower
        # The tables of the account and auth apps exist once account 0001 is applied; the
        # admin log only after `migrate admin` (a table that does not exist holds no rows).
        self.required = model._meta.app_label in ("account", "auth")
        # Groups are matched by name: other tables (of other apps) may point at them.
        self.merged = model is Group or model is Group.permissions.through
        drop_id = model._meta.auto_created or model in NATURAL_KEYS
        self.plain, self.keyed = [], {}
        for f in model._meta.concrete_fields:
            if f.primary_key and drop_id:
                continue
            if f.is_relation and f.related_model in NATURAL_KEYS:
                self.keyed[f"{f.name}_key"] = f
            else:
                self.plain.append(f.attname)
        self.columns = self.plain + list(self.keyed)
        # What the file's columns are written into.
        self.target_columns = self.plain + [f.attname for f in self.keyed.values()]

    def __repr__(self):
        return f"Table({self.name})"

    def queryset(self):
        """The rows as the file holds them: one query, natural keys joined in, by primary key."""
        keys = {}
        for column, f in self.keyed.items():
            key = JSONArray(*[f"{f.name}__{lookup}" for lookup in NATURAL_KEYS[f.related_model]])
            if f.null:  # null, not [null, null]
                key = Case(When(**{f"{f.attname}__isnull": True}, then=None), default=key)
            keys[column] = key
        return self.model._default_manager.order_by("pk").values(*self.plain, **keys)

    def keys_used(self) -> dict[str, set]:
        """The natural keys of the rows this table's rows point at (and its own, for groups)."""
        used = defaultdict(set)
        if self.model in NATURAL_KEYS:
            used[self.label] |= set(self.model.objects.values_list(*NATURAL_KEYS[self.model]))
        for f in self.keyed.values():
            lookups = [f"{f.name}__{lookup}" for lookup in NATURAL_KEYS[f.related_model]]
            rows = self.model.objects.filter(**{f"{f.attname}__isnull": False})
            used[f.related_model._meta.label_lower] |= set(
                rows.values_list(*lookups).distinct().order_by()
            )
        return used


def backed_up_models() -> list:
    """Every model a backup holds, in an order that restores without foreign key errors."""
    through = [m._meta.get_field(n).remote_field.through for m in (User, NewUser)
               for n in ("groups", "user_permissions")]  # fmt: skip
    models = [
        Group,
        Group.permissions.through,
        User,
        through[0],
        through[1],
        NewUser,
        through[2],
        through[3],
        # What the last sync wrote: restored with the users, so the next sync knows what
        # changed since the backup (without it, restored users would look like signups).
        SyncState,
        Profile,
        Address,
        Activity,
        Notification,
    ]
    if apps.is_installed("django.contrib.admin"):
        # The admin log points at users (AUTH_USER_MODEL): it goes and comes back with them.
        from django.contrib.admin.models import LogEntry

        models.append(LogEntry)
    return models


def tables() -> list[Table]:
    return [Table(model) for model in backed_up_models()]


@dataclass
class Outcome:
    path: Path
    rows: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # a restore of an unkeyed file says so

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def log(self, kind: str, started_at) -> None:
        """Record the run for the status page: counts and the file name, no personal data."""
        summary = {"rows": self.rows, "file": self.path.name, "seconds": self.seconds}
        if self.warnings:  # unkeyed: the file's integrity was not proven
            summary["unkeyed"] = True
        OperationLog.objects.create(
            kind=kind,
            ok=True,
            started_at=started_at,
            summary=summary,
            message=f"{self.total} rows, {self.path.name}"
            + (" (unkeyed: its integrity was not proven)" if self.warnings else ""),
        )

    def line(self, verb: str) -> str:
        size = self.path.stat().st_size if self.path.exists() else 0
        return (
            f"{verb} {self.total} rows from {len(self.rows)} tables in {self.seconds:.1f} s "
            f"({self.total / max(self.seconds, 1e-9):,.0f} rows/s), {self.path} "
            f"({size / 1e6:.1f} MB)."
        )


class Progress:
    """Progress of a backup or restore: a bar on a terminal, or at verbosity 2 a line per tenth.

    The lines (on stdout) are for logs and pipes, where no bar is shown; a test that kills a run
    mid-way waits for one.
    """

    def __init__(self, label: str, *, verbosity: int, stdout=None):
        self.label, self.stdout = label, stdout
        self.lines = verbosity >= 2 and stdout is not None
        self.bar = progress(None, label, verbosity=0 if self.lines else verbosity)
        self.total = self.done = self.next_line = 0

    def start(self, total: int) -> None:
        self.total = total
        self.next_line = total / 10
        self.bar.reset(total=total)

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.lines and self.total and self.next_line <= self.done < self.total:
            self.stdout.write(
                f"  {self.label}: {self.done:,} of {self.total:,} rows "
                f"({100 * self.done // self.total}%)"
            )
            self.stdout.flush()
            self.next_line = (self.done * 10 // self.total + 1) * self.total / 10

    def close(self) -> None:
        self.bar.close()


def applied_migrations() -> dict[str, list[str]]:
    recorder = MigrationRecorder(connection)
    applied = sorted(recorder.applied_migrations())
    return {app: [name for a, name in applied if a == app] for app in APPS}


def existing_tables() -> set[str]:
    with connection.cursor() as cursor:
        return set(connection.introspection.table_names(cursor))


# --- backup ---------------------------------------------------------------------------------

EVERY = 10_000  # rows between progress reports


def _rows_postgresql(table: Table, out, digest, on_rows) -> int:
    """Let PostgreSQL write the JSON (COPY ... TO STDOUT): the fastest path, memory flat."""
    query, params = table.queryset().query.sql_with_params()
    # CSV with a quote and a delimiter that JSON never contains: each line is the JSON as is.
    sql = (
        f"COPY (SELECT json_build_object('t', %s::text, 'r', row_to_json(x)) FROM ({query}) x) "
        "TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    )
    n = reported = 0
    with connection.cursor() as cursor, cursor.cursor.copy(sql, [table.name, *params]) as copy:
        for chunk in copy:
            data = bytes(chunk)
            digest.update(data)
            out.write(data)
            n += data.count(b"\n")
            if n - reported >= EVERY:
                on_rows(n - reported)
                reported = n
    on_rows(n - reported)
    return n


def _rows_orm(table: Table, out, digest, on_rows, chunk_size=5000) -> int:
    n = 0
    for n, row in enumerate(table.queryset().iterator(chunk_size=chunk_size), 1):
        line = orjson.dumps({"t": table.name, "r": row}, default=str) + b"\n"
        digest.update(line)
        out.write(line)
        if n % EVERY == 0:
            on_rows(EVERY)
    on_rows(n % EVERY)
    return n


def tables_to_back_up() -> tuple[list[Table], list[Table]]:
    """(the tables there are, the optional tables not created yet); refuses an unmigrated one."""
    existing = existing_tables()
    everything = tables()
    missing = [t.name for t in everything if t.required and t.name not in existing]
    if missing:
        raise BackupError(
            f"Nothing to back up: this database has no {missing[0]} table (its migrations were "
            "never applied). Migrate it first: python manage.py migrate (or make populate)."
        )
    return (
        [t for t in everything if t.name in existing],
        [t for t in everything if t.name not in existing],
    )


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove the partial files killed backups left in `directory`; returns what was removed.

    A backup holds an exclusive lock on its partial file while it writes it: a file that can be
    locked belongs to no running backup.
    """
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not PARTIAL.match(path.name) or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            removed.append(path)
        except OSError:
            continue  # locked: a backup is writing it (or gone, or not ours to remove)
        finally:
            os.close(fd)
    return removed


def _create_partial(path: Path):
    """Create `path` (mode 0600, never over a file) locked for as long as it stays open."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # Another backup's clean-up may have taken the lock first, between open() and flock().
    if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
        os.close(fd)
        raise BackupError(f"{path} was removed by another backup as it started; run it again.")
    return open(fd, "w+b")  # noqa: SIM115


def _fsync_directory(directory: Path) -> None:
    """Make the new name (and the removed partial one) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(*, directory, output=None, compress: bool = True, progress=None) -> Outcome:
    """Write every account table to a new backup file; returns what it wrote.

    The file is `directory/accounts-<UTC timestamp>.jsonl[.gz]` unless `output` names one;
    an existing file is never overwritten. `progress` (a Progress) is told the total, then
    the rows as they are written.
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
    on_rows = progress.update if progress else lambda n: None
    present, absent = tables_to_back_up()
    directory = final.parent
    partial = directory / f".{final.name}.partial"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # only if new
        remove_stale_partials(directory)
        full = _create_partial(partial)
    except FileExistsError:
        raise BackupError(
            f"Another backup is writing {final} now: wait for it, or choose another --output."
        ) from None
    except OSError as exc:
        raise BackupError(
            f"Cannot write a backup into {directory}: {exc.strerror or exc}."
        ) from exc
    outcome = Outcome(path=final)
    digest = hashlib.sha256()
    write_rows = _rows_postgresql if connection.vendor == "postgresql" else _rows_orm
    try:
        with full, tempfile.TemporaryFile(dir=directory) as data:  # unnamed: a kill leaves none
            # One snapshot for every table, so links and users agree.
            nested = connection.in_atomic_block
            with transaction.atomic():
                if connection.vendor == "postgresql" and not nested:
                    with connection.cursor() as cursor:
                        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                migrations = applied_migrations()
                if progress:
                    progress.start(sum(t.model.objects.count() for t in present))
                out = gzip.GzipFile(fileobj=data, mode="wb", compresslevel=1) if compress else data
                for table in present:
                    outcome.rows[table.name] = write_rows(table, out, digest, on_rows)
                if out is not data:
                    out.close()  # ends the gzip member; `data` stays open
                natural_keys = defaultdict(set)
                for table in present:
                    for label, keys in table.keys_used().items():
                        natural_keys[label] |= keys
            for table in absent:
                outcome.rows[table.name] = 0
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "created_at": datetime.now(UTC).isoformat(),
                "database": connection.vendor,
                "user_model": settings.AUTH_USER_MODEL,
                "migrations": migrations,
                "tables": {
                    t.name: {"columns": t.columns, "rows": outcome.rows[t.name]} for t in tables()
                },
                "natural_keys": {
                    label: sorted(map(list, keys)) for label, keys in sorted(natural_keys.items())
                },
                "sha256": digest.hexdigest(),
            }
            manifest["hmac"] = manifest_hmac(manifest)  # over the rows' sha256 too
            manifest["manifest_sha256"] = manifest_digest(manifest)
            # The manifest first, then the data as it is (gzip members may be concatenated).
            head = gzip.GzipFile(fileobj=full, mode="wb", compresslevel=1) if compress else full
            head.write(orjson.dumps(manifest) + b"\n")
            if head is not full:
                head.close()  # ends the manifest's gzip member; `full` stays open
            data.seek(0)
            shutil.copyfileobj(data, full, 1 << 20)
            full.flush()
            os.fsync(full.fileno())
            try:
                os.link(partial, final)  # never overwrites: fails if the name exists
            except FileExistsError:
                raise BackupError(
                    f"{final} already exists; a backup never overwrites a file."
                ) from None
    except OSError as exc:
        raise BackupError(f"Cannot write the backup {final}: {exc.strerror or exc}.") from exc
    finally:
        partial.unlink(missing_ok=True)
    _fsync_directory(directory)
    outcome.seconds = time.perf_counter() - started
    return outcome


# --- restore --------------------------------------------------------------------------------


def _open_in(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")  # noqa: SIM115


def _data_lines(f, chunk_size=1 << 20, digest=None):
    """The lines after the manifest, read in large chunks (much faster than readline on gzip).
    `digest` (a hashlib object) is fed every byte read, as `verify_file` hashes them."""
    f.readline()
    rest = b""
    while chunk := f.read(chunk_size):
        if digest is not None:
            digest.update(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 of the manifest without its own digest, keys sorted (so the same on reading)."""
    rest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _backup_key() -> bytes:
    """The HMAC key: settings.BACKUP_KEY, or SECRET_KEY when it is empty. Never written out."""
    return (getattr(settings, "BACKUP_KEY", "") or settings.SECRET_KEY).encode()


def _key_name() -> str:
    """Which setting holds the key, for messages (never the key itself)."""
    key = getattr(settings, "BACKUP_KEY", "")
    return "BACKUP_KEY" if key and key != settings.SECRET_KEY else "SECRET_KEY (BACKUP_KEY unset)"


def manifest_hmac(manifest: dict) -> str:
    """HMAC-SHA256 (keyed with `_backup_key()`) of the manifest without its HMAC and its
    digest, keys sorted: it covers the rows through their sha256."""
    rest = {k: v for k, v in manifest.items() if k not in ("hmac", "manifest_sha256")}
    message = orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)
    return hmac.new(_backup_key(), message, hashlib.sha256).hexdigest()


def _check_key(path: Path, manifest: dict, accept_unkeyed: bool) -> None:
    """Refuse a file whose HMAC does not match (always), or that has none (unless accepted)."""
    version = manifest["version"]
    if "hmac" in manifest:
        mac = manifest["hmac"]
        if not (
            isinstance(mac, str)
            and hmac.compare_digest(mac.encode(), manifest_hmac(manifest).encode())
        ):
            raise BackupError(
                f"{path} does not match its HMAC: it was made with another BACKUP_KEY (or "
                "SECRET_KEY, when BACKUP_KEY is unset), or changed since; nothing was restored. "
                f"It was checked with {_key_name()}: set BACKUP_KEY to the key it was made with, "
                "then restore."
            )
    elif version not in UNKEYED_VERSIONS:
        raise BackupError(
            f"{path} is a version {version} backup without its HMAC: this app always writes one, "
            "so the file was changed since it was made; nothing was restored. Restore an "
            "unchanged copy of it."
        )
    elif not accept_unkeyed:
        raise BackupError(
            f"{path} is an unkeyed backup (format version {version}, no HMAC): its integrity "
            "cannot be proven, anyone could have changed it; nothing was restored. Restore it "
            "only if you trust the file, with --accept-unkeyed."
        )


def unkeyed_warning(path, manifest: dict) -> str | None:
    """What to tell the user restoring a file without an HMAC (None for a keyed one)."""
    if "hmac" in manifest:
        return None
    return (
        f"Warning: {path} is an unkeyed backup (format version {manifest['version']}, no HMAC), "
        "read with --accept-unkeyed: its integrity cannot be proven (anyone could have changed "
        "it)."
    )


def _is_list_of(value, kind, length=None) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        and (length is None or len(value) == length)
    )


# The length of each natural key in the manifest (see NATURAL_KEYS).
KEY_LENGTHS = {model._meta.label_lower: len(lookups) for model, lookups in NATURAL_KEYS.items()}


def damaged_part(manifest: dict) -> str | None:
    """The first part of a manifest that is not the shape this app writes, or None."""
    for key, kind in (("tables", dict), ("migrations", dict), ("natural_keys", dict),
                      ("user_model", str), ("sha256", str)):  # fmt: skip
        if not isinstance(manifest.get(key), kind):
            return key
    for name, spec in manifest["tables"].items():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("rows"), int)
            and not isinstance(spec["rows"], bool)
            and spec["rows"] >= 0
            and _is_list_of(spec.get("columns"), str)
        ):
            return f"tables.{name}"
    for app, names in manifest["migrations"].items():
        if not _is_list_of(names, str):
            return f"migrations.{app}"
    for label, keys in manifest["natural_keys"].items():
        if label not in KEY_LENGTHS or not (
            isinstance(keys, list) and all(_is_list_of(k, str, KEY_LENGTHS[label]) for k in keys)
        ):
            return f"natural_keys.{label}"
    return None


def read_manifest(path, *, accept_unkeyed: bool = False) -> dict:
    """The manifest of a backup file, checked against what this version of the app can read.

    Its HMAC must match, and be there: `accept_unkeyed` lets a file of an unkeyed format
    (versions 2 and 3) through, never one whose HMAC does not match.
    """
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
    version = manifest.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        *first, last = map(str, READABLE_VERSIONS)
        raise BackupError(
            f"{path} is backup format version {version!r}; this app reads versions "
            f"{', '.join(first)} and {last} only (restore it with the version of the app that "
            "made it)."
        )
    if version >= 3 and manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BackupError(
            f"{path} has a damaged manifest (it does not match its checksum); nothing was restored."
        )
    _check_key(path, manifest, accept_unkeyed)
    broken = damaged_part(manifest)
    if broken:
        raise BackupError(f"{path} has a damaged manifest (see {broken}); nothing was restored.")
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


def _shown(keys, n=3) -> str:
    names = [".".join(k) for k in keys[:n]]
    return ", ".join(names) + (f" and {len(keys) - n} more" if len(keys) > n else "")


@dataclass
class Plan:
    """What restoring a (valid) file would do to this database, and why it would refuse."""

    path: Path
    manifest: dict
    replace: bool
    rows: dict[str, int]  # the rows of each table in the file
    here: dict[str, int] = field(default_factory=dict)  # what they replace here (existing tables)
    problems: list[str] = field(default_factory=list)  # every refusal, most fundamental first
    notes: list[str] = field(default_factory=list)  # what the dry run should say besides
    warnings: list[str] = field(default_factory=list)  # said by the dry run and the restore
    # Drop the secondary indexes and rebuild them after loading (PostgreSQL; the role must own
    # the tables to alter them), or load through them.
    build_indexes_after: bool = True

    @property
    def tables(self) -> list[Table]:
        """The file's tables this database has, in restore order."""
        return [t for t in tables() if t.name in self.here]

    @property
    def emptied(self) -> list[Table]:
        return [t for t in self.tables if not t.merged]

    @property
    def group_names(self) -> list[str]:
        return [name for (name,) in self.manifest["natural_keys"].get("auth.group", [])]

    def rows_here(self, table: Table) -> int:
        """The rows of `table` a restore replaces: all of them, or those of the file's groups."""
        if table.model is Group:
            return Group.objects.filter(name__in=self.group_names).count()
        if table.merged:
            return table.model.objects.filter(group__name__in=self.group_names).count()
        return table.model.objects.count()

    def check(self) -> None:
        """Fill `here` and `problems`; writes nothing."""
        manifest, problems = self.manifest, self.problems
        by_name = {t.name: t for t in tables()}
        unknown = sorted(set(manifest["tables"]) - set(by_name))
        if unknown:
            problems.append(
                f"The backup holds tables this app does not have ({', '.join(unknown)}): "
                "restore it with the version of the app that made it."
            )
            return
        user_model = manifest.get("user_model")
        if user_model != settings.AUTH_USER_MODEL:
            problems.append(
                f"The backup was made with AUTH_USER_MODEL = {user_model}, this project runs "
                f"with {settings.AUTH_USER_MODEL}: restore it with the setting it was made with."
            )
        theirs, ours = manifest["migrations"].get("account") or [], applied_migrations()["account"]
        if theirs != ours:
            target = theirs[-1] if theirs else "zero"
            problems.append(
                f"The backup was made at account migration {target}, this database is at "
                f"{ours[-1] if ours else 'none (never migrated)'}: migrate it to the same point "
                f"first (python manage.py migrate account {target}), then restore."
            )
            return  # the tables may not exist yet: nothing more to compare
        existing = existing_tables()
        loaded = []
        for name, spec in manifest["tables"].items():
            table = by_name[name]
            if name not in existing:
                if spec["rows"]:
                    app = table.model._meta.app_label
                    problems.append(
                        f"The backup holds {spec['rows']} rows of {name}, a table this database "
                        f"does not have: python manage.py migrate {app}, then restore."
                    )
                continue
            if spec["columns"] != table.columns:
                problems.append(
                    f"The columns of {name} in the backup differ from this database's; "
                    "restore with the version of the app that made it."
                )
                continue
            loaded.append(table)
        if connection.vendor == "postgresql" and not self.check_role(loaded):
            return  # counting the rows here would fail too
        for table in loaded:
            self.here[table.name] = self.rows_here(table)
        for model, what in ((Permission, "permissions"), (ContentType, "content types")):
            wanted = manifest["natural_keys"].get(model._meta.label_lower, [])
            have = set(_target_keys(model)) if wanted else set()
            missing = [k for k in wanted if tuple(k) not in have]
            if missing:
                problems.append(
                    f"The backup names {len(missing)} {what} this database does not have "
                    f"({_shown(missing)}): migrate it (python manage.py migrate creates them for "
                    "every installed app) or install the apps that define them, then restore."
                )
        busy = [f"{name} ({n})" for name, n in self.here.items() if n]
        if busy and not self.replace:
            problems.append(
                f"These tables already hold rows: {', '.join(busy)}. Restore into empty tables, "
                "or pass --replace to replace them (in the same transaction)."
            )
        for table, column, target in _referencing(
            {t.name for t in self.emptied}, set(manifest["tables"])
        ):
            problems.append(
                f"Table {table} points at {target} ({column}) and holds rows that this backup "
                f"does not hold: a restore would delete the rows they point at. Back {table} up "
                "and empty it yourself, then restore."
            )

    def check_role(self, loaded: list[Table]) -> bool:
        """PostgreSQL: may this database role do what the restore does? False if it may not.

        A restore reads and writes the tables (deleting with --replace; a group's permission
        links are always replaced), moves their id sequences past the restored ids (setval:
        UPDATE on the sequence) and logs itself in account_operationlog. Dropping and
        rebuilding indexes takes the tables' owner: a role that may only read and write them
        loads through the indexes instead (slower on large tables).
        """
        user, rights = _role_rights([t.model for t in loaded] + [OperationLog])
        denied, sequences, not_owned = [], [], []
        for table in loaded:
            owns, may = rights[table.name]
            needed = ["SELECT", "INSERT"]
            if (self.replace and not table.merged) or table.model is Group.permissions.through:
                needed.append("DELETE")
            denied += [f"{verb} {table.name}" for verb in needed if not may[verb]]
            if not may["setval"]:
                sequences.append(table.name)
            if not owns and not table.merged:
                not_owned.append(table.name)
        log = OperationLog._meta.db_table
        if not (rights[log][1]["INSERT"] and rights[log][1]["nextval"]):
            denied.append(f"INSERT {log}")
        if denied:
            self.problems.append(
                f"The database role {user} may not {_listed(denied)}, which a restore does: "
                "restore as the role that owns the tables (the one that ran the migrations), or "
                f"GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA public TO {user}."
            )
        if sequences:
            self.problems.append(
                f"The database role {user} may not move the id sequences of {_listed(sequences)} "
                "past the restored ids: restore as the role that owns the tables, or GRANT "
                f"USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {user}."
            )
        if not_owned:
            self.build_indexes_after = False
            self.notes.append(
                f"The database role {user} does not own {_listed(not_owned)}: the rows will be "
                "loaded through the indexes (slower on large tables; restore as the tables' "
                "owner to build the indexes once, after loading)."
            )
        return not denied


def _listed(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _role_rights(models) -> tuple[str, dict]:
    """PostgreSQL: (current user, {table: (owns it, {privilege: held})}); the privileges are
    SELECT, INSERT, DELETE on the table, and on its id sequence setval (UPDATE, to move it)
    and nextval (USAGE or UPDATE, to insert a row without an id)."""
    rights = {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user")
        (user,) = cursor.fetchone()
        for model in models:
            table, pk = model._meta.db_table, model._meta.pk
            cursor.execute(
                """SELECT pg_has_role(c.relowner, 'USAGE'),
                          has_table_privilege(c.oid, 'SELECT'),
                          has_table_privilege(c.oid, 'INSERT'),
                          has_table_privilege(c.oid, 'DELETE'),
                          s.seq IS NULL OR has_sequence_privilege(s.seq, 'UPDATE'),
                          s.seq IS NULL OR has_sequence_privilege(s.seq, 'USAGE, UPDATE')
                   FROM pg_class c, pg_get_serial_sequence(%s, %s) s (seq)
                   WHERE c.oid = %s::regclass""",
                [
                    connection.ops.quote_name(table),
                    pk.column if pk.get_internal_type().endswith("AutoField") else None,
                    connection.ops.quote_name(table),
                ],
            )
            owns, select, insert, delete, setval, nextval = cursor.fetchone()
            may = {"SELECT": select, "INSERT": insert, "DELETE": delete, "setval": setval,
                   "nextval": nextval}  # fmt: skip
            rights[table] = (owns, may)
    return user, rights


def _target_keys(model) -> dict[tuple, int]:
    """Natural key -> id, for every row of `model` in this database."""
    return {tuple(k): pk for *k, pk in model.objects.values_list(*NATURAL_KEYS[model], "pk")}


def _referencing(targets: set[str], backed_up: set[str]) -> list[tuple[str, str, str]]:
    """(table, columns, target) for each table the backup does not hold whose rows point at a
    table in `targets` (which the restore empties): every foreign key in the catalog, in any
    schema, whatever its ON DELETE (CASCADE would delete those rows, SET NULL would cut them
    loose, NO ACTION would refuse)."""
    found = []
    with connection.cursor() as cursor:
        for target in sorted(targets):
            for fk in catalog.foreign_keys_to(target, exclude=backed_up):
                not_null = " OR ".join(
                    f"{connection.ops.quote_name(c)} IS NOT NULL" for c in fk.columns
                )
                cursor.execute(
                    f"SELECT 1 FROM {catalog.sql_name(fk.table)} WHERE {not_null} LIMIT 1"
                )
                if cursor.fetchone():
                    found.append((fk.table, ", ".join(fk.columns), target))
    return found


def plan_restore(
    path, *, replace: bool = False, read_rows: bool = False, accept_unkeyed: bool = False
) -> Plan:
    """Check the file (refusing a damaged or foreign one) and what restoring it would do here.

    `read_rows` (the dry run) also reads every row, refusing a line that is not a row the
    manifest describes and row counts that differ from it; a restore checks each row as it
    loads it instead (and rolls back). `accept_unkeyed`: see `read_manifest`.
    """
    path = Path(path)
    manifest = read_manifest(path, accept_unkeyed=accept_unkeyed)
    rows = verify_file(path, manifest)
    if read_rows:
        by_name = {t.name: t for t in tables()}
        counted = defaultdict(int)
        for name, values in table_rows(path, manifest):
            counted[name] = _count_checked(path, manifest, by_name.get(name), values)
        for name, n in rows.items():
            if counted[name] != n:
                raise BackupError(
                    f"{path} holds {counted[name]} rows of {name}, its manifest says {n}: the "
                    "file is damaged; nothing was restored."
                )
    plan = Plan(path=path, manifest=manifest, replace=replace, rows=rows)
    plan.warnings = [w for w in [unkeyed_warning(path, manifest)] if w]
    try:
        plan.check()
    except OperationalError:
        raise  # the database is down: the command line says so, naming the database
    except DatabaseError as exc:
        raise BackupError(
            f"Cannot check this database for a restore ({_first_line(exc)}): restore as the role "
            "that owns the tables (the one that ran the migrations)."
        ) from exc
    return plan


def _count_checked(path: Path, manifest: dict, table: Table | None, values) -> int:
    """The rows of `table`, each natural key in them checked against the manifest's list."""
    listed = {label: {tuple(k) for k in keys} for label, keys in manifest["natural_keys"].items()}
    keyed = [
        (table.columns.index(column), f.related_model)
        for column, f in (table.keyed.items() if table else ())
    ]
    n = 0
    for n, row in enumerate(values, 1):  # noqa: B007 (n is used after the loop)
        for i, model in keyed:
            key = row[i]
            if key is not None and not (
                _is_list_of(key, str) and tuple(key) in listed.get(model._meta.label_lower, ())
            ):
                raise BackupError(
                    f"{path}: {table.name} names the {model._meta.verbose_name} {_key_text(key)}, "
                    "which its manifest does not list; the file is damaged, nothing was restored."
                )
    return n


def _key_text(key) -> str:
    """A natural key for messages: account.newuser.view_newuser (or as it is, if malformed)."""
    return ".".join(key) if _is_list_of(key, str) else repr(key)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _records(path: Path, digest=None):
    """(line number, table, row) for each data line; refuses a line that is not a row."""
    with _open_in(path) as f:
        for n, line in enumerate(_data_lines(f, digest=digest), 2):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise BackupError(
                    f"{path}: line {n} is not JSON; the file is damaged, nothing was restored."
                ) from None
            if not (
                type(record) is dict
                and type(record.get("t")) is str
                and type(record.get("r")) is dict
            ):
                raise BackupError(
                    f'{path}: line {n} is not a row of a table ({{"t": table, "r": '
                    "{column: value}}); the file is damaged, nothing was restored."
                )
            yield n, record["t"], record["r"]


def table_rows(path: Path, manifest: dict, digest=None):
    """The file's rows, table after table: (table, its rows as tuples in its columns' order).

    The checksum proves a file is the one that was written, not that it holds rows: each line
    must be a row of a table the manifest lists, with that table's columns, one table after
    another. Each table's rows must be read before the next table's.
    """
    specs, seen = manifest["tables"], set()
    for name, group in groupby(_records(path, digest), key=itemgetter(1)):
        if name not in specs or name in seen:
            n = next(group)[0]
            where = "its manifest does not list" if name not in specs else "came earlier"
            raise BackupError(
                f"{path}: line {n} holds a row of {name}, a table {where}; the file is damaged, "
                "nothing was restored."
            )
        seen.add(name)
        yield name, _values(path, name, specs[name]["columns"], group)  # noqa: B031 (once)


def _values(path, name, columns, group):
    for n, _, row in group:
        if list(row) != columns:
            raise BackupError(
                f"{path}: line {n}, a row of {name}, does not have the columns its manifest lists; "
                "the file is damaged, nothing was restored."
            )
        yield tuple(row.values())


class _Loader:
    """Writes the file's rows into this database, mapping natural keys to this database's ids."""

    def __init__(self, plan: Plan, progress):
        self.plan = plan
        self.progress = progress
        self.ids = {model: _target_keys(model) for model in (Permission, ContentType)}
        self.group_ids: list[int] = []

    def run(self) -> None:
        """Everything a restore writes, in one transaction, checked before it commits."""
        plan = self.plan
        by_name = {t.name: t for t in plan.tables}
        # Load into bare tables, then build indexes and constraints once (and check them).
        # Altering a table takes its owner: another role loads through the indexes.
        rebuilt = (
            indexes_built_after([t.model for t in plan.emptied])
            if plan.build_indexes_after
            else nullcontext()
        )
        # COPY goes through psycopg's cursor: let Django name its errors (IntegrityError, ...).
        # The engine's own writes: after a cut-over the legacy table is read-only for the app
        # (and NewUser after a rollback), but a restore puts back both (account/readonly.py).
        with transaction.atomic(), connection.wrap_database_errors, readonly.engine_writes():
            with rebuilt:
                if plan.replace:
                    with connection.cursor() as cursor:
                        for table in reversed(plan.emptied):
                            cursor.execute(f"DELETE FROM {connection.ops.quote_name(table.name)}")
                # Lines come table after table: one streamed COPY (or bulk_create) per table.
                # The bytes loaded are hashed again: a file changed after its check (the
                # check and the load read it twice) is rolled back, never committed.
                digest = hashlib.sha256()
                for name, rows in table_rows(plan.path, plan.manifest, digest):
                    if name not in by_name:  # no table here, so the manifest counted 0 rows
                        raise BackupError(
                            f"{plan.path} holds rows of {name}, which its manifest does not "
                            "count; the file is damaged, nothing was restored."
                        )
                    self.load(by_name[name], rows)
            if digest.hexdigest() != plan.manifest.get("sha256"):
                raise BackupError(
                    f"{plan.path} changed while it was restored (its rows no longer match the "
                    "checksum its HMAC covers); rolled back, nothing changed."
                )
            reset_sequences([t.model for t in plan.tables])
            for table in plan.tables:
                if self.count(table) != plan.rows[table.name]:
                    raise BackupError(
                        f"After restoring, {table.name} does not hold the "
                        f"{plan.rows[table.name]} rows of the backup; rolled back."
                    )

    def load(self, table: Table, rows) -> None:
        if table.model is Group:
            self._merge_groups([name for (name,) in rows])
            return
        try:
            insert_rows(table.model, table.target_columns, self._counted(self._mapped(table, rows)))
        except (ValidationError, ValueError, TypeError) as exc:  # SQLite: a value Django refuses
            raise BackupError(
                f"{self.plan.path}: a row of {table.name} holds a value its column cannot take "
                f"({_first_line(exc)}); rolled back, nothing changed."
            ) from exc

    def _merge_groups(self, names: list[str]) -> None:
        """Groups are matched by name: create the missing ones, replace their permissions."""
        existing = set(Group.objects.filter(name__in=names).values_list("name", flat=True))
        Group.objects.bulk_create([Group(name=n) for n in names if n not in existing])
        self.ids[Group] = _target_keys(Group)
        self.group_ids = [self.ids[Group][(n,)] for n in names]
        Group.permissions.through.objects.filter(group_id__in=self.group_ids).delete()
        if self.progress:
            self.progress.update(len(names))

    def _mapped(self, table: Table, rows):
        keyed = [
            (table.columns.index(column), self.ids[f.related_model], f.related_model)
            for column, f in table.keyed.items()
        ]
        if not keyed:
            yield from rows
            return
        for row in rows:
            row = list(row)
            for i, ids, model in keyed:
                if row[i] is not None:
                    try:
                        row[i] = ids[tuple(row[i])]
                    except (KeyError, TypeError):  # unknown, or not a list of names
                        raise BackupError(
                            f"{self.plan.path}: {table.name} names the {model._meta.verbose_name} "
                            f"{_key_text(row[i])}, which the manifest does not list and this "
                            "database does not have; nothing was restored."
                        ) from None
            yield row

    def _counted(self, rows):
        n = 0
        for n, row in enumerate(rows, 1):  # noqa: B007 (n is used after the loop)
            yield row
            if self.progress and n % EVERY == 0:
                self.progress.update(EVERY)
        if self.progress:
            self.progress.update(n % EVERY)

    def count(self, table: Table) -> int:
        """The rows this restore wrote into `table` (all of them, in an emptied table)."""
        if table.model is Group:
            return len(set(self.group_ids))
        if table.merged:
            return table.model.objects.filter(group_id__in=self.group_ids).count()
        return table.model.objects.count()


def restore(path, *, replace=False, progress=None, accept_unkeyed=False) -> Outcome:
    """Check a backup and this database, then load the file in one transaction.

    `accept_unkeyed`: restore a file of an unkeyed format too (see `read_manifest`); the
    outcome's warnings then say that its integrity cannot be proven.
    """
    started = time.perf_counter()
    plan = plan_restore(path, replace=replace, accept_unkeyed=accept_unkeyed)
    if plan.problems:
        raise BackupError(plan.problems[0])
    if progress:
        progress.start(sum(plan.rows[t.name] for t in plan.tables))
    try:
        _Loader(plan, progress).run()
    except Error as exc:  # a constraint, a privilege, a value: the transaction rolled back
        raise BackupError(
            f"{plan.path} could not be loaded ({_first_line(exc)}); rolled back, nothing changed."
        ) from exc
    outcome = Outcome(path=plan.path, rows={t.name: plan.rows[t.name] for t in plan.tables})
    outcome.warnings = plan.warnings
    outcome.seconds = time.perf_counter() - started
    return outcome
