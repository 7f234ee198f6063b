"""Backup and restore: exact round trip, refusals that leave the database untouched."""

import fcntl
import gzip
import hashlib
import hmac
import os
import re
import stat
import subprocess
import sys
from io import StringIO
from pathlib import Path

import orjson
import pytest
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth import authenticate
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import ProgrammingError, connection

from account import backup as backup_module
from account.models import Activity, Address, NewUser, Notification, OperationLog, User

from .backup_helpers import everything, rights, wipe
from .conftest import ROOT, assert_clean_failure, subprocess_env

pytestmark = pytest.mark.django_db


@pytest.fixture
def populated(run, dirty_legacy, settings):
    run("populate_fake_user_bulk", "300", "--dirty", "0.2", "--seed", "9", "--password", "pw")
    run("copy_users", "--skip-invalid")
    user = NewUser.objects.get(pk=dirty_legacy["admin"].pk)
    Address.objects.create(
        user=user, street_address="Thamel 5", city="Kathmandu", postal_code="44600"
    )
    Activity.objects.create(user=user, activity_type="login")
    Notification.objects.create(
        user=user, message_body="Welcome to the new schema\nline two \u2603"
    )
    user.groups.add(dirty_legacy["group"])
    dirty_legacy["group"].permissions.add(Permission.objects.get(codename="change_address"))
    LogEntry.objects.create(
        user=user,
        content_type=ContentType.objects.get_for_model(Address),
        object_id="1",
        object_repr="Thamel 5, Kathmandu",
        action_flag=ADDITION,
    )
    LogEntry.objects.create(user=user, object_repr="no type", action_flag=ADDITION)
    return dirty_legacy


def backup_path(run, settings, *args) -> Path:
    run("backup_accounts", *args)
    return next(Path(settings.BACKUP_DIR).glob("accounts-*"))


@pytest.mark.parametrize("gzip_it", [True, False])
def test_round_trip_is_exact_and_users_still_log_in(run, populated, settings, gzip_it):
    before = everything()
    assert before["account_newuser"] and before["account_address"] and before["django_admin_log"]
    out, _ = run("backup_accounts", *([] if gzip_it else ["--no-gzip"]))
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    assert path.name.endswith(".jsonl.gz" if gzip_it else ".jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "rows/s" in out and "MB" in out
    wipe()
    assert NewUser.objects.count() == 0
    out, _ = run("restore_accounts", str(path))
    assert "Restored" in out
    assert everything() == before  # field for field, timestamps to the microsecond
    admin = NewUser.objects.get(pk=populated["admin"].pk)
    assert admin.last_login.microsecond == 123456
    user = populated["clean"][3]
    assert authenticate(username=user.username, password="old-secret").pk == user.pk
    # Sequences were reset: a new signup gets a fresh id.
    assert NewUser.objects.create_user("after", "after@example.com", "pw").pk > admin.pk


def test_manifest_describes_the_file(run, populated, settings):
    path = backup_path(run, settings)
    with gzip.open(path) as f:
        manifest = orjson.loads(f.readline())
        lines = sum(1 for _ in f)
    assert manifest["format"] == "account-backup" and manifest["version"] == 4
    assert "0002_copy_legacy_users" in manifest["migrations"]["account"]
    assert manifest["user_model"] == "account.NewUser"
    assert sum(t["rows"] for t in manifest["tables"].values()) == lines
    assert manifest["tables"]["account_user"]["rows"] == User.objects.count()
    assert manifest["tables"]["django_admin_log"]["rows"] == 2
    assert len(manifest["sha256"]) == 64
    assert manifest["manifest_sha256"] == backup_module.manifest_digest(manifest)
    # The HMAC, as the module's docstring describes it (computed here without its code).
    rest = {k: v for k, v in manifest.items() if k not in ("hmac", "manifest_sha256")}
    key = settings.BACKUP_KEY.encode()
    assert key and settings.BACKUP_KEY == settings.SECRET_KEY  # the tests set no BACKUP_KEY
    message = orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)
    assert manifest["hmac"] == hmac.new(key, message, hashlib.sha256).hexdigest()


def test_permissions_groups_and_content_types_are_written_by_natural_key(run, populated, settings):
    path = backup_path(run, settings, "--no-gzip")
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    manifest, rows = lines[0], lines[1:]
    by_table = {}
    for row in rows:
        by_table.setdefault(row["t"], []).append(row["r"])
    assert by_table["auth_group"] == [{"name": "editors"}]
    assert {"user_id": populated["admin"].pk, "permission_key": ["account", "newuser",
            "view_newuser"]} in by_table["account_user_user_permissions"]  # fmt: skip
    assert {"newuser_id": populated["admin"].pk, "group_key": ["editors"]} in by_table[
        "account_newuser_groups"
    ]
    log = by_table["django_admin_log"]
    assert [e["content_type_key"] for e in log] == [["account", "address"], None]
    assert ["account", "address", "change_address"] in manifest["natural_keys"]["auth.permission"]
    assert manifest["natural_keys"]["contenttypes.contenttype"] == [["account", "address"]]
    assert manifest["natural_keys"]["auth.group"] == [["editors"]]


def test_backups_never_overwrite(run, populated, settings, tmp_path):
    target = tmp_path / "mine.jsonl.gz"
    run("backup_accounts", "--output", str(target))
    size = target.stat().st_size
    with pytest.raises(CommandError, match="already exists"):
        run("backup_accounts", "--output", str(target))
    assert target.stat().st_size == size
    run("backup_accounts")
    run("backup_accounts")
    assert len(list(Path(settings.BACKUP_DIR).glob("accounts-*"))) == 2


def test_a_backup_into_a_directory_it_cannot_create_is_refused_in_one_line(run, db, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CommandError, match="Cannot write a backup into"):
        run("backup_accounts", "--dir", str(blocker / "backups"))


def _corrupt_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x55
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 4])


def _sign(manifest, sign):
    """Make the manifest's HMAC and digest anew, those it holds: `sign="key"` both, as someone
    holding this database's BACKUP_KEY would; "checksum" the digest only, as anyone can; None
    neither."""
    if sign == "key" and "hmac" in manifest:
        manifest["hmac"] = backup_module.manifest_hmac(manifest)
    if sign in ("key", "checksum") and "manifest_sha256" in manifest:
        manifest["manifest_sha256"] = backup_module.manifest_digest(manifest)


def _rewrite_manifest(path, change, sign="key"):
    """Change the manifest, then `_sign` it: as someone forging a file would."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        manifest = orjson.loads(f.readline())
        rest = f.read()
    change(manifest)
    _sign(manifest, sign)
    with opener(path, "wb") as f:
        f.write(orjson.dumps(manifest) + b"\n" + rest)


def _rewrite_rows(path, change, sign="key"):
    """Change the data lines (a list of bytes), the rows' checksum made anew and the manifest
    signed (`_sign`): a hand-made file."""
    manifest, *lines = path.read_bytes().splitlines(keepends=True)
    change(lines)
    manifest = orjson.loads(manifest)
    manifest["sha256"] = hashlib.sha256(b"".join(lines)).hexdigest()
    _sign(manifest, sign)
    path.write_bytes(orjson.dumps(manifest) + b"\n" + b"".join(lines))


def _other_version(path):
    _rewrite_manifest(path, lambda manifest: manifest.update(version=1))


def _foreign(path):
    path.write_bytes(b'{"model": "auth.user", "pk": 1}\n')


def _manifest_without_counts(path):
    _rewrite_manifest(path, lambda manifest: manifest["tables"]["account_user"].pop("rows"))


def _manifest_edited(path):
    # One more row counted, the manifest's checksum left as it was.
    _rewrite_manifest(path, lambda m: m["tables"]["account_user"].update(rows=1), sign=None)


DAMAGES = [
    (_corrupt_byte, "corrupted or truncated"),
    (_truncate, "corrupted or truncated"),
    (_other_version, "format version 1"),
    (_foreign, "not an account backup"),
    (lambda p: p.unlink(), "No backup file"),
    (_manifest_without_counts, "damaged manifest"),
    (_manifest_edited, r"damaged manifest \(it does not match its checksum\)"),
]


@pytest.mark.parametrize("damage, message", DAMAGES)
@pytest.mark.parametrize("gzip_it", [True, False])
def test_damaged_backups_are_refused_and_the_database_is_untouched(
    run, populated, settings, damage, message, gzip_it
):
    path = backup_path(run, settings, *([] if gzip_it else ["--no-gzip"]))
    damage(path)
    wipe()
    NewUser.objects.create_user("survivor", "survivor@example.com", "pw")
    before = everything()
    with pytest.raises(CommandError, match=message):
        run("restore_accounts", str(path), "--replace")
    assert everything() == before


@pytest.mark.parametrize("damage, message", DAMAGES[:2] + DAMAGES[-1:])
def test_a_dry_run_refuses_a_damaged_file(run, populated, settings, damage, message):
    path = backup_path(run, settings)
    damage(path)
    with pytest.raises(CommandError, match=message):
        run("restore_accounts", str(path), "--dry-run")


def test_a_forged_file_that_breaks_a_constraint_is_rolled_back_in_one_line(
    run, populated, settings
):
    path = backup_path(run, settings, "--no-gzip")

    def duplicate_a_user(lines):
        duplicate = next(line for line in lines if b'"account_newuser"' in line)
        lines.insert(lines.index(duplicate), duplicate)

    _rewrite_rows(path, duplicate_a_user)
    _rewrite_manifest(path, lambda m: m["tables"]["account_newuser"].update(
        rows=m["tables"]["account_newuser"]["rows"] + 1))  # fmt: skip
    wipe()
    before = everything()
    with pytest.raises(CommandError, match="could not be loaded .*; rolled back, nothing changed"):
        run("restore_accounts", str(path))
    assert everything() == before


def test_any_database_error_while_loading_is_rolled_back_in_one_line(
    run, populated, settings, monkeypatch
):
    path = backup_path(run, settings)
    before = everything()

    def refused(model, *args, **kwargs):  # what a role that lost a privilege meanwhile meets
        raise ProgrammingError(f"permission denied for table {model._meta.db_table}\nDETAIL: x")

    monkeypatch.setattr(backup_module, "insert_rows", refused)
    with pytest.raises(CommandError) as refusal:
        run("restore_accounts", str(path), "--replace")
    assert str(refusal.value).endswith(
        "could not be loaded (permission denied for table auth_group_permissions); rolled back, "
        "nothing changed."
    )
    assert everything() == before


# Manifests of hand-made files, their checksums right: each part must have the shape the app
# writes, or the restore refuses in one line (not a TypeError half-way through the checks).
MANIFEST_SHAPES = [
    ("natural_keys", "auth.group", [["editors", "x"]]),
    ("natural_keys", "auth.permission", None),
    ("natural_keys", "auth.permission", [[["account"], "newuser", "view_newuser"]]),
    ("natural_keys", "auth.user", []),
    ("tables", "account_user", {"columns": ["id"], "rows": True}),
    ("tables", "account_user", {"columns": [1], "rows": 1}),
    ("migrations", "account", "0002_copy_legacy_users"),
]


@pytest.mark.parametrize("part, key, value", MANIFEST_SHAPES)
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_manifest_part_of_the_wrong_shape_is_refused_in_one_line(
    run, populated, settings, part, key, value, dry_run
):
    path = backup_path(run, settings)
    _rewrite_manifest(path, lambda manifest: manifest[part].update({key: value}))
    before = everything()
    with pytest.raises(CommandError, match=rf"damaged manifest \(see {part}\.{key}\)"):
        run("restore_accounts", str(path), "--replace", *(["--dry-run"] if dry_run else []))
    assert everything() == before


def test_a_manifest_field_of_the_wrong_type_is_refused_in_one_line(run, populated, settings):
    path = backup_path(run, settings)
    _rewrite_manifest(path, lambda manifest: manifest.update(user_model=["account.NewUser"]))
    with pytest.raises(CommandError, match=r"damaged manifest \(see user_model\)"):
        run("restore_accounts", str(path), "--replace")


def _first_row_of(table, lines):
    return next(i for i, line in enumerate(lines) if orjson.loads(line)["t"] == table)


def _insert(line):
    return lambda lines: lines.insert(3, line)


def _second_user_reordered(lines):
    i = _first_row_of("account_newuser", lines) + 1
    record = orjson.loads(lines[i])
    record["r"] = dict(reversed(record["r"].items()))
    lines[i] = orjson.dumps(record) + b"\n"


def _user_id_not_a_number(lines):
    i = _first_row_of("account_newuser", lines)
    record = orjson.loads(lines[i])
    record["r"]["id"] = "abc"
    lines[i] = orjson.dumps(record) + b"\n"


def _bad_permission_key(lines):
    i = _first_row_of("account_user_user_permissions", lines)
    record = orjson.loads(lines[i])
    record["r"]["permission_key"] = [["account"], "newuser", "view_newuser"]
    lines[i] = orjson.dumps(record) + b"\n"


# Data lines of hand-made files, their checksums right.
ROW_DAMAGES = [
    (_insert(b"[1]\n"), "line 5 is not a row of a table"),
    (_insert(b'{"t": "account_user"}\n'), "line 5 is not a row of a table"),
    (_insert(b'{"t": 5, "r": {}}\n'), "line 5 is not a row of a table"),
    (_insert(b"{not json\n"), "line 5 is not JSON"),
    (_insert(b'{"t": "project_note", "r": {}}\n'), "project_note, a table its manifest does not"),
    (_second_user_reordered, "a row of account_newuser, does not have the columns"),
    (_bad_permission_key, "names the permission [['account'], 'newuser', 'view_newuser']"),
]


@pytest.mark.parametrize("damage, message", ROW_DAMAGES)
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_data_line_that_is_not_a_row_is_refused_in_one_line(
    run, populated, settings, damage, message, dry_run
):
    path = backup_path(run, settings, "--no-gzip")
    _rewrite_rows(path, damage)
    before = everything()
    with pytest.raises(CommandError, match=re.escape(message)):
        run("restore_accounts", str(path), "--replace", *(["--dry-run"] if dry_run else []))
    assert everything() == before


def test_a_row_with_a_value_its_column_cannot_take_is_rolled_back_in_one_line(
    run, populated, settings
):
    path = backup_path(run, settings, "--no-gzip")
    _rewrite_rows(path, _user_id_not_a_number)
    before = everything()
    with pytest.raises(CommandError, match="abc.*; rolled back, nothing changed"):
        run("restore_accounts", str(path), "--replace")
    assert everything() == before


# --- the key: a file is restored only if its HMAC proves it was written with this key --------

ANOTHER_KEY = "another-backup-key-of-another-machine-0123456789"


def _make_a_superuser(lines):
    """The attack: a user given superuser rights inside the file."""
    for i, line in enumerate(lines):
        record = orjson.loads(line)
        if record["t"] == "account_newuser" and not record["r"]["is_superuser"]:
            record["r"]["is_superuser"] = True
            lines[i] = orjson.dumps(record) + b"\n"
            return
    raise AssertionError("no user without superuser rights in the backup")


def _claim_version(version):
    """Make a version 4 manifest look like an older, unkeyed one (a downgrade)."""

    def change(manifest):
        manifest["version"] = version
        del manifest["hmac"]
        if version == 2:
            del manifest["manifest_sha256"]

    return change


def _checksums_hold(path) -> bool:
    """Whether the file's sha256 and manifest_sha256 are right (so only the HMAC can tell)."""
    manifest, *lines = path.read_bytes().splitlines(keepends=True)
    manifest = orjson.loads(manifest)
    return manifest["sha256"] == hashlib.sha256(b"".join(lines)).hexdigest() and manifest.get(
        "manifest_sha256", backup_module.manifest_digest(manifest)
    ) == backup_module.manifest_digest(manifest)


MISMATCH = (
    r"does not match its HMAC: it was made with another BACKUP_KEY \(or SECRET_KEY, when "
    r"BACKUP_KEY is unset\), or changed since; nothing was restored\. It was checked with "
    r"SECRET_KEY \(BACKUP_KEY unset\): set BACKUP_KEY to the key it was made with, then restore\."
)
EVERY_WAY = [[], ["--accept-unkeyed"], ["--dry-run"], ["--dry-run", "--accept-unkeyed"]]


def _refusal(run, path, flags) -> str:
    with pytest.raises(CommandError) as refusal:
        run("restore_accounts", str(path), "--replace", *flags)
    message = str(refusal.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize("flags", EVERY_WAY)
def test_a_row_changed_with_its_checksums_made_anew_is_refused(run, populated, settings, flags):
    path = backup_path(run, settings, "--no-gzip")
    _rewrite_rows(path, _make_a_superuser, sign="checksum")
    assert _checksums_hold(path)
    before = everything()
    assert re.search(MISMATCH, _refusal(run, path, flags))
    assert everything() == before


# Manifests changed by someone without the key, their digest made anew.
MANIFEST_FORGERIES = [
    lambda m: m.update(version=3),  # a downgrade that keeps the HMAC: it covers the version
    lambda m: m["natural_keys"]["auth.group"].append(["admins"]),
    lambda m: m["tables"]["account_newuser"].update(
        rows=m["tables"]["account_newuser"]["rows"] + 1
    ),
    lambda m: m.update(hmac=m["hmac"].upper()),
    lambda m: m.update(hmac=None),
]


@pytest.mark.parametrize("forge", MANIFEST_FORGERIES)
@pytest.mark.parametrize("flags", [[], ["--dry-run", "--accept-unkeyed"]])
def test_a_manifest_changed_without_the_key_is_refused(run, populated, settings, forge, flags):
    path = backup_path(run, settings)
    _rewrite_manifest(path, forge, sign="checksum")
    before = everything()
    assert re.search(MISMATCH, _refusal(run, path, flags))
    assert everything() == before


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_downgrade_to_an_unkeyed_version_is_refused_without_the_flag(
    run, populated, settings, version, dry_run
):
    # The attack in full: a superuser made in the file, the checksums made anew, and the
    # manifest passed off as an older format that had no HMAC.
    path = backup_path(run, settings, "--no-gzip")
    _rewrite_rows(path, _make_a_superuser, sign="checksum")
    _rewrite_manifest(path, _claim_version(version), sign="checksum")
    assert _checksums_hold(path)
    before = everything()
    message = _refusal(run, path, ["--dry-run"] if dry_run else [])
    assert message.endswith(
        f"{path} is an unkeyed backup (format version {version}, no HMAC): its integrity cannot "
        "be proven, anyone could have changed it; nothing was restored. Restore it only if you "
        "trust the file, with --accept-unkeyed."
    )
    assert everything() == before


@pytest.mark.parametrize("version", [2, 3])
def test_an_unkeyed_file_is_restored_with_the_flag_which_says_so(run, populated, settings, version):
    path = backup_path(run, settings)
    before = everything()
    _rewrite_manifest(path, _claim_version(version), sign="checksum")
    NewUser.objects.filter(username="padded").update(full_name="Changed Since")
    warning = (
        f"Warning: {path} is an unkeyed backup (format version {version}, no HMAC), read with "
        "--accept-unkeyed: its integrity cannot be proven (anyone could have changed it)."
    )
    out, err = run("restore_accounts", str(path), "--replace", "--dry-run", "--accept-unkeyed")
    assert err.strip() == warning
    assert "is unkeyed (its integrity cannot be proven)" in out and "intact" not in out
    out, err = run("restore_accounts", str(path), "--replace", "--accept-unkeyed")
    assert "Restored" in out and err.strip() == warning
    assert everything() == before
    log = OperationLog.objects.filter(kind="restore").first()
    assert log.summary["unkeyed"] is True and "integrity was not proven" in log.message


@pytest.mark.parametrize("flags", EVERY_WAY)
def test_a_version_4_manifest_without_its_hmac_is_refused_even_with_the_flag(
    run, populated, settings, flags
):
    path = backup_path(run, settings)
    _rewrite_manifest(path, lambda manifest: manifest.pop("hmac"), sign="checksum")
    before = everything()
    assert _refusal(run, path, flags).endswith(
        f"{path} is a version 4 backup without its HMAC: this app always writes one, so the file "
        "was changed since it was made; nothing was restored. Restore an unchanged copy of it."
    )
    assert everything() == before


@pytest.mark.parametrize("flags", EVERY_WAY)
def test_a_file_made_with_another_key_is_refused_even_with_the_flag(
    run, populated, settings, flags
):
    path = backup_path(run, settings)
    settings.BACKUP_KEY = ANOTHER_KEY
    before = everything()
    message = _refusal(run, path, flags)
    assert "does not match its HMAC" in message and "It was checked with BACKUP_KEY:" in message
    assert ANOTHER_KEY not in message and settings.SECRET_KEY not in message
    assert everything() == before


def test_the_backup_key_restores_on_another_machine_and_never_appears(run, populated, settings):
    settings.BACKUP_KEY = ANOTHER_KEY
    path = backup_path(run, settings, "--no-gzip")
    before = everything()
    data = path.read_bytes()
    assert ANOTHER_KEY.encode() not in data and settings.SECRET_KEY.encode() not in data
    # Another machine: another SECRET_KEY, the same BACKUP_KEY.
    settings.SECRET_KEY = "the-secret-key-of-the-machine-that-restores-0123456789"
    NewUser.objects.filter(username="padded").update(full_name="Changed Since")
    out, err = run("restore_accounts", str(path), "--replace", "--dry-run")
    assert "is intact (its HMAC matches)" in out and err == ""
    run("restore_accounts", str(path), "--replace")
    assert everything() == before
    # BACKUP_KEY left unset there: SECRET_KEY is the key, and it is another one.
    settings.BACKUP_KEY = ""
    message = _refusal(run, path, [])
    assert "checked with SECRET_KEY (BACKUP_KEY unset)" in message
    assert ANOTHER_KEY not in message and settings.SECRET_KEY not in message


@pytest.mark.slow
@pytest.mark.parametrize("backup_key", [None, ""], ids=["unset", "empty"])
def test_backup_key_unset_or_empty_in_the_environment_is_the_secret_key(run, settings, backup_key):
    # Not `populated`: the copy it runs holds its tables locked until the test ends.
    secret = "the-secret-key-the-backup-was-made-with-0123456789"
    settings.BACKUP_KEY = secret
    path = backup_path(run, settings)

    def dry_run(secret_key):
        env = subprocess_env(SECRET_KEY=secret_key)
        env.pop("BACKUP_KEY", None)
        if backup_key is not None:
            env["BACKUP_KEY"] = backup_key
        command = [sys.executable, str(ROOT / "manage.py"), "restore_accounts", str(path),
                   "--replace", "--dry-run"]  # fmt: skip
        return subprocess.run(command, env=env, capture_output=True, text=True)

    proc = dry_run(secret)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is intact (its HMAC matches)" in proc.stdout
    proc = dry_run("another-secret-key-0123456789-0123456789-0123456789")
    assert_clean_failure(proc, "does not match its HMAC", "checked with SECRET_KEY (BACKUP_KEY")
    assert secret not in proc.stdout + proc.stderr


def test_the_flags_help_says_the_files_integrity_cannot_be_proven():
    from account.management.commands.restore_accounts import Command

    text = " ".join(Command().create_parser("manage.py", "restore_accounts").format_help().split())
    assert "--accept-unkeyed Also read a backup of an old, unkeyed format (version 2 or 3" in text
    assert "Its integrity cannot be proven: anyone could have changed it" in text
    assert "A file whose HMAC does not match is refused all the same." in text


def test_restore_refuses_tables_with_rows_unless_replace(run, populated, settings):
    path = backup_path(run, settings)
    before = everything()
    with pytest.raises(CommandError, match="already hold rows.*--replace"):
        run("restore_accounts", str(path))
    assert everything() == before


def test_replace_restores_the_backup_over_changed_rows(run, populated, settings):
    path = backup_path(run, settings)
    before = everything()
    NewUser.objects.filter(username="padded").update(full_name="Changed Since")
    NewUser.objects.create_user("signup", "signup@example.com", "pw")
    run("restore_accounts", str(path), "--replace")
    assert everything() == before


def test_replace_works_while_the_admin_log_points_at_users(run, populated, settings):
    path = backup_path(run, settings)
    before = everything()
    newcomer = NewUser.objects.create_user("newcomer", "newcomer@example.com", "pw")
    LogEntry.objects.create(user=newcomer, object_repr="after the backup", action_flag=ADDITION)
    run("restore_accounts", str(path), "--replace")
    assert everything() == before
    assert not LogEntry.objects.filter(object_repr="after the backup").exists()


def test_a_dry_run_reports_that_replace_is_needed_and_writes_nothing(run, populated, settings):
    path = backup_path(run, settings)
    NewUser.objects.filter(username="padded").update(full_name="Changed Since")
    before = everything()
    stdout = StringIO()
    with pytest.raises(CommandError, match="Dry run: a restore would refuse: These tables"):
        call_command("restore_accounts", str(path), "--dry-run", stdout=stdout)
    out = stdout.getvalue()
    assert "A restore would refuse: These tables already hold rows" in out
    assert "--replace" in out and "Nothing was written" in out
    assert f"account_newuser: {NewUser.objects.count()} rows in the file" in out
    assert everything() == before


@pytest.mark.slow
def test_a_dry_run_that_would_refuse_exits_1_with_the_reason_even_at_verbosity_0(run, settings):
    # Not `populated`: the copy it runs holds its tables locked until the test ends.
    path = backup_path(run, settings)
    _rewrite_manifest(path, lambda manifest: manifest.update(user_model="account.User"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "restore_accounts", str(path), "--dry-run",
         "-v", "0"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert_clean_failure(proc, "Dry run: a restore would refuse: The backup was made with AUTH_")
    assert proc.returncode == 1
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_dry_run_with_replace_reports_what_it_would_delete(run, populated, settings):
    path = backup_path(run, settings)
    before = everything()
    out, _ = run("restore_accounts", str(path), "--replace", "--dry-run")
    assert "refuse" not in out
    assert "(deleted)" in out and "Nothing was written" in out
    assert everything() == before


def test_restore_refuses_a_database_at_another_migration(run, populated, settings):
    path = backup_path(run, settings)
    _rewrite_manifest(
        path, lambda manifest: manifest["migrations"].update(account=["0001_initial"])
    )
    wipe()
    with pytest.raises(CommandError, match="migrate account 0001_initial"):
        run("restore_accounts", str(path))


def test_restore_refuses_a_backup_made_with_another_user_model(run, populated, settings):
    path = backup_path(run, settings)
    _rewrite_manifest(path, lambda manifest: manifest.update(user_model="account.User"))
    wipe()
    with pytest.raises(CommandError, match="AUTH_USER_MODEL = account.User"):
        run("restore_accounts", str(path))


def test_restore_refuses_a_permission_this_database_lacks_before_writing(run, populated, settings):
    path = backup_path(run, settings)
    wipe()
    Permission.objects.filter(codename="change_address").delete()
    before = everything()
    with pytest.raises(CommandError, match=r"1 permissions .*account\.address\.change_address"):
        run("restore_accounts", str(path))
    assert everything() == before


def test_groups_are_matched_by_name_and_get_the_backups_permissions(run, populated, settings):
    path = backup_path(run, settings)
    expected = rights()
    wipe()
    # Another group with the same name (another id, other permissions), and one of its own.
    editors = Group.objects.create(name="editors")
    editors.permissions.add(Permission.objects.get(codename="delete_newuser"))
    other = Group.objects.create(name="other")
    other.permissions.add(Permission.objects.get(codename="delete_newuser"))
    with pytest.raises(CommandError, match=r"auth_group \(1\)"):
        run("restore_accounts", str(path))
    run("restore_accounts", str(path), "--replace")
    assert rights() == expected
    assert Group.objects.get(name="editors").pk == editors.pk
    assert list(other.permissions.values_list("codename", flat=True)) == ["delete_newuser"]


def test_restore_refuses_when_a_project_table_points_at_the_users(run, populated, settings):
    path = backup_path(run, settings)
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE project_note (id integer PRIMARY KEY, author_id bigint "
            f"REFERENCES {qn('account_newuser')} (id), body text)"
        )
        cursor.execute("INSERT INTO project_note VALUES (1, %s, 'kept')", [populated["admin"].pk])
    before = everything()
    with pytest.raises(CommandError, match="project_note points at account_newuser"):
        run("restore_accounts", str(path), "--replace")
    assert everything() == before
    with pytest.raises(CommandError, match="Dry run: a restore would refuse: Table project_note"):
        run("restore_accounts", str(path), "--replace", "--dry-run")


def test_final_messages_are_quiet_at_verbosity_0(run, populated, settings):
    out, _ = run("backup_accounts", "-v", "0")
    assert out == ""
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    assert run("restore_accounts", str(path), "--replace", "--dry-run", "-v", "0")[0] == ""
    wipe()
    assert run("restore_accounts", str(path), "-v", "0")[0] == ""
    assert NewUser.objects.exists()


def test_progress_lines_at_verbosity_2(run, populated, settings, monkeypatch):
    monkeypatch.setattr(backup_module, "EVERY", 100)
    out, _ = run("backup_accounts", "-v", "2")
    assert "  backup: " in out and "%)" in out
    path = next(Path(settings.BACKUP_DIR).glob("accounts-*"))
    out, _ = run("restore_accounts", str(path), "--replace", "-v", "2")
    assert "  restore: " in out and "%)" in out


def test_each_run_is_logged_for_the_status_page(run, populated, settings):
    path = backup_path(run, settings)
    run("restore_accounts", str(path), "--replace")
    run("restore_accounts", str(path), "--replace", "--dry-run")
    assert list(OperationLog.objects.filter(kind__in=["backup", "restore"]).values_list(
        "kind", flat=True)) == ["restore", "backup"]  # fmt: skip


# --- partial files --------------------------------------------------------------------------


def _partial(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"half a backup")
    path.chmod(0o600)
    return path


def test_the_next_backup_removes_stale_partial_files(run, populated, settings):
    directory = Path(settings.BACKUP_DIR)
    stale = [
        _partial(directory, ".accounts-20250101-000000-000000.jsonl.gz.partial"),
        _partial(directory, ".accounts-20250101-000000-000000.jsonl.gz.data.partial"),
        _partial(directory, ".mine.jsonl.partial"),
    ]
    others = [_partial(directory, ".notes.partial"), _partial(directory, "keep.jsonl.partial")]
    run("backup_accounts")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)
    assert len(list(directory.glob("accounts-*"))) == 1


def test_a_backup_leaves_the_partial_file_of_a_running_backup_alone(run, populated, settings):
    live = _partial(Path(settings.BACKUP_DIR), ".accounts-20250101-000000-000000.jsonl.gz.partial")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as the running backup holds it
        run("backup_accounts")
        assert live.exists()


def test_the_directory_is_fsynced_after_the_rename(run, populated, settings, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append([p.name for p in Path(settings.BACKUP_DIR).iterdir()])
        real_fsync(fd)

    monkeypatch.setattr(backup_module.os, "fsync", fsync)
    run("backup_accounts")
    final = next(Path(settings.BACKUP_DIR).glob("accounts-*")).name
    assert synced == [[final]]  # after the rename, and after the partial name was removed


# --- the scripts ----------------------------------------------------------------------------


def _script(name, *args, url=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        env=subprocess_env(url),
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", ["backup.py", "restore.py"])
def test_the_scripts_help_names_the_script(script):
    proc = _script(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: scripts/{script} [-h]")


@pytest.mark.slow
def test_restore_script_exits_non_zero_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("garbage\n")
    proc = _script("restore.py", str(bad))
    assert_clean_failure(proc, "not a readable account backup")
    assert "BackupError" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_backup_with_the_database_down_exits_non_zero_with_a_clear_message(tmp_path):
    proc = _script("backup.py", "--dir", str(tmp_path), url="postgres://postgres@127.0.0.1:1/x")
    assert_clean_failure(proc, "Database error")
    assert list(tmp_path.iterdir()) == []


def test_a_file_changed_between_its_check_and_its_load_is_rolled_back(
    run, populated, settings, monkeypatch
):
    """The check and the load read the file twice: the load hashes what it reads again."""
    path = backup_path(run, settings, "--no-gzip")
    checked = backup_module.verify_file

    def verify_then_swap(*args, **kwargs):
        rows = checked(*args, **kwargs)
        manifest, *lines = path.read_bytes().splitlines(keepends=True)
        _make_a_superuser(lines)  # after the check, before the load: the manifest unchanged
        path.write_bytes(manifest + b"".join(lines))
        return rows

    monkeypatch.setattr(backup_module, "verify_file", verify_then_swap)
    before = everything()
    with pytest.raises(CommandError, match="changed while it was restored .*; rolled back"):
        run("restore_accounts", str(path), "--replace")
    assert everything() == before
