"""Settings from the environment, one-line errors instead of tracebacks, and the make targets."""

import os
import re
import shutil
import signal
import stat
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from config.dburl import mask_password, mask_passwords_in
from config.settings import database_from_url

from .conftest import ROOT, assert_clean_failure, manage, subprocess_env

pytestmark = pytest.mark.slow

PRODUCTION = {
    "DEBUG": "off",
    "SECRET_KEY": "a-real-secret-key-" + "x7Qp2Lm9Zr4Tv8Wy1Bn6Hc3Jd5Kf0Gs" * 2,
    "ALLOWED_HOSTS": "accounts.example.com",
    "SECURE_SSL_REDIRECT": "on",
    "SESSION_COOKIE_SECURE": "on",
    "CSRF_COOKIE_SECURE": "on",
    "SECURE_HSTS_SECONDS": "31536000",
}


def production_env(tmp_path, **overrides):
    env = subprocess_env(f"sqlite:///{tmp_path / 'x.sqlite3'}", **{**PRODUCTION, **overrides})
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    return env


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    proc = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues" in proc.stdout


def test_missing_secret_key_with_debug_off_fails_clearly(tmp_path):
    env = production_env(tmp_path)
    env.pop("SECRET_KEY")
    proc = manage("check", env=env)
    assert_clean_failure(proc, "SECRET_KEY is not set")


@pytest.mark.parametrize(
    "url, message",
    [
        ("not-a-url", "is not a database URL this app understands"),
        ("postgress://postgres:s3cret@127.0.0.1:5432/accounts", "is not a database URL"),
        ("mysql://u:s3cret@h/db", "is not a database URL this app understands"),
        ("postgres://u:s3cret@h:notaport/db", "is malformed"),
        ("postgres://u:s3cret@h:5432/", "names no database"),
        ("postgres:/postgres:s3cret@127.0.0.1/x", "names no host"),  # a slash missing
        ("postgres://postgres:s3/cret@127.0.0.1/x", "percent-encode the characters / ? # @"),
        ("postgres://postgres:s3?cret@127.0.0.1/x", "percent-encode the characters / ? # @"),
        ("postgres://postgres:s3#cret@127.0.0.1/x", "percent-encode the characters / ? # @"),
        ("postgres://postgres:1234/s3cret@127.0.0.1/x", "is malformed"),  # a port that parses
        ("postgres://u:s3cret@[::1/x", "is malformed"),
    ],
)
def test_malformed_database_url_is_one_clear_line_without_its_password(url, message):
    proc = manage("migrate", url=url)
    assert_clean_failure(proc, "Configuration error", message)
    assert "s3cret" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(ImproperlyConfigured) as refusal:
        database_from_url(url)
    assert "s3cret" not in str(refusal.value)


def test_a_password_the_parser_chokes_on_is_never_echoed():
    # urlsplit reads "postgres:s3" as host and port: its message names the port, "s3".
    proc = manage("migrate", url="postgres://postgres:s3/cret@127.0.0.1/x")
    assert_clean_failure(proc, "is malformed")
    assert "s3" not in proc.stderr


def test_a_server_message_quoting_a_user_and_password_is_masked():
    # The server names the database it was asked for; a malformed URL can put a password
    # there (before the settings refused them, "postgres:/user:pw@host/x" did).
    url = "postgres://postgres@127.0.0.1:5432/postgres%3As3cret%40elsewhere"
    proc = manage("migrate", url=url)
    assert_clean_failure(proc, 'database "postgres:***@elsewhere" does not exist')
    assert "postgres:s3cret@" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_database_that_is_down_is_one_clear_line_without_the_password():
    # Nothing listens on port 1.
    proc = manage("migrate", url="postgres://postgres:s3cret@127.0.0.1:1/nowhere")
    assert_clean_failure(proc, "Database error (postgres://postgres:***@127.0.0.1:1/nowhere)")
    assert "s3cret" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgres://app:s3cret@db:5432/accounts", "postgres://app:***@db:5432/accounts"),
        ("postgres://app@db/accounts", "postgres://app@db/accounts"),  # nothing to hide
        ("postgres://app:p@ss/w0rd@db/accounts", "postgres://app:***@db/accounts"),  # unescaped
        ("postgres://:s3cret@db/accounts", "postgres://:***@db/accounts"),
        (
            "postgres://db/accounts?sslmode=require&password=s3cret",
            "postgres://db/accounts?sslmode=require&password=***",
        ),  # fmt: skip
        ("postgres//app:s3cret@db/accounts", "postgres//app:***@db/accounts"),  # no "://"
        ("sqlite:////srv/app/db.sqlite3", "sqlite:////srv/app/db.sqlite3"),
        ("", ""),
    ],
)
def test_mask_password_hides_the_password_and_keeps_the_rest(url, shown):
    assert mask_password(url) == shown


@pytest.mark.parametrize(
    "text, shown",
    [
        ('FATAL: database "postgres:s3cret@127.0.0.1/x" does not exist',
         'FATAL: database "postgres:***@127.0.0.1/x" does not exist'),
        ("failed (postgres://u:s3cret@h/x): refused", "failed (postgres://u:***@h/x): refused"),
        ("use postgres://USER:PASSWORD@HOST:PORT/NAME", "use postgres://USER:PASSWORD@HOST:PORT/NAME"),
        ("ana@example.com is taken at 12:30", "ana@example.com is taken at 12:30"),
    ],
)  # fmt: skip
def test_mask_passwords_in_masks_every_user_and_password_in_a_message(text, shown):
    assert mask_passwords_in(text) == shown


def test_sqlite_is_the_default_database(monkeypatch):
    config = database_from_url("sqlite:////tmp/demo.sqlite3")
    assert config["ENGINE"] == "django.db.backends.sqlite3"
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgres://postgres@127.0.0.1:1/nowhere", "Database error"),
        ("postgres//missing-colon", "Configuration error"),
    ],
)
@pytest.mark.parametrize("target", ["migrate", "populate", "migrate-data", "backup", "run"])
def test_make_targets_fail_in_one_clear_line(target, url, message):
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("make targets run from the project's .venv: run `make install` first")
    proc = subprocess.run(
        ["make", "-s", target], cwd=ROOT, env=subprocess_env(url), capture_output=True, text=True
    )
    assert_clean_failure(proc, message)
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1, proc.stderr


# One-line errors of the project's commands (account.management.base.OneLineErrorCommand).


@pytest.mark.parametrize(
    "command, args",
    [
        ("populate_fake_user_bulk", []),
        ("populate_fake_user_bulk", ["many"]),
        ("populate_fake_user_bulk", ["10", "--frobnicate"]),
        ("populate_fake_user_bulk", ["10", "--dirty", "1.5"]),
        ("wait_for_db", ["--timeout", "soon"]),
        ("check_migrated", ["extra"]),
    ],
)
def test_bad_arguments_end_in_one_line_pointing_at_help(command, args):
    proc = manage(command, *args)
    assert_clean_failure(proc)
    assert proc.returncode == 2  # argparse's status for a bad command line
    assert proc.stdout == ""
    assert re.fullmatch(
        rf"{command}: error: .+ \(see `manage\.py {command} --help`\)\n", proc.stderr
    ), proc.stderr


def test_refusals_end_in_one_line_without_a_class_name():
    # Nothing listens on port 1, and wait_for_db gives up at once.
    url = "postgres://postgres:s3cret@127.0.0.1:1/nowhere"
    proc = manage("wait_for_db", "--timeout", "0", url=url)
    assert_clean_failure(proc)
    assert proc.returncode == 1
    assert proc.stderr.startswith("wait_for_db: error: The database did not accept connections")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Error:" not in proc.stderr and "s3cret" not in proc.stderr


def test_a_mistyped_command_is_one_line_with_a_suggestion():
    proc = manage("populate_fake_users", "10")
    assert_clean_failure(proc, "unknown command 'populate_fake_users'")
    assert "did you mean 'populate_fake_user_bulk'?" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.django_db
def test_wait_for_db_is_silent_at_verbosity_0_when_the_database_answers():
    out, err = StringIO(), StringIO()
    call_command("wait_for_db", verbosity=0, stdout=out, stderr=err)
    assert (out.getvalue(), err.getvalue()) == ("", "")


def test_check_migrated_refuses_an_unknown_database_alias_in_one_line():
    proc = manage("check_migrated", "--database", "nope")
    assert_clean_failure(proc, "argument --database: invalid choice: 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.django_db
def test_check_migrated_is_silent_at_verbosity_0_on_a_migrated_database():
    out, err = StringIO(), StringIO()
    call_command("check_migrated", verbosity=0, stdout=out, stderr=err)
    assert (out.getvalue(), err.getvalue()) == ("", "")


# make run, install and help.


def needs_venv():
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("make targets run from the project's .venv: run `make install` first")


def make(*args, cwd=ROOT, env=None, timeout=120):
    """Run `make -s ARGS`; a target still running after `timeout` (a server) is killed, whole."""
    proc = subprocess.Popen(
        ["make", "-s", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"`make {' '.join(args)}` was still running after {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_make_run_never_migrates_and_names_make_migrate_data(fresh_database_url):
    needs_venv()
    populated = manage("populate_fake_user_bulk", "20", "--migrate", url=fresh_database_url)
    assert populated.returncode == 0, populated.stderr  # the legacy schema only: 0001
    proc = make("run", env=subprocess_env(fresh_database_url), timeout=30)
    assert_clean_failure(proc, "run `make migrate-data` first")
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1, proc.stderr
    shown = manage("showmigrations", "account", url=fresh_database_url).stdout
    assert "[ ] 0002_copy_legacy_users" in shown


def test_make_run_on_a_database_never_migrated_says_what_to_run(fresh_database_url):
    needs_venv()
    proc = make("run", env=subprocess_env(fresh_database_url), timeout=30)
    assert_clean_failure(proc, "The database is not migrated", "`make migrate`")
    assert "[ ]" in manage("showmigrations", "account", url=fresh_database_url).stdout


def project_copy(tmp_path) -> Path:
    """The project's files (not its .venv, .env, databases or output) in a temporary directory."""
    copy = tmp_path / "project"
    ignore = shutil.ignore_patterns(".venv", ".git", ".env", "*.sqlite3", "reports", "backups",
                                    "results", "staticfiles", "media", "__pycache__",
                                    ".pytest_cache", ".ruff_cache")  # fmt: skip
    shutil.copytree(ROOT, copy, ignore=ignore)  # copy2 keeps times: the .venv stays up to date
    return copy


def clean_env(**extra) -> dict:
    """A shell's environment with nothing of the app's settings in it."""
    keep = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"}
    return {**{k: v for k, v in os.environ.items() if k in keep}, **extra}


def test_make_install_creates_an_env_with_debug_off_and_a_secret_key_that_starts(tmp_path):
    needs_venv()
    project = project_copy(tmp_path)
    venv = ROOT / ".venv"
    proc = make("install", f"VENV={venv}", cwd=project, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dotenv = project / ".env"
    assert stat.S_IMODE(dotenv.stat().st_mode) == 0o600
    values = dict(
        line.split("=", 1) for line in dotenv.read_text().splitlines() if re.match(r"\w+=", line)
    )
    assert len(values["SECRET_KEY"]) >= 50
    shown = subprocess.run(
        [venv / "bin" / "python", "manage.py", "shell", "--no-imports", "-c",
         "from django.conf import settings; print(settings.DEBUG, settings.SECRET_KEY)"],
        cwd=project, env=clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert shown.stdout.split() == ["False", values["SECRET_KEY"]], shown.stderr


def test_make_install_writes_a_random_url_safe_postgres_password(tmp_path):
    """docker-compose.yml puts POSTGRES_PASSWORD in web's DATABASE_URL as it is."""
    needs_venv()
    passwords = []
    for install in ("first", "second"):
        project = project_copy(tmp_path / install)
        proc = make("install", f"VENV={ROOT / '.venv'}", cwd=project, env=clean_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        passwords += re.findall(r"^POSTGRES_PASSWORD=(.*)$", (project / ".env").read_text(), re.M)
    assert len(passwords) == 2 and passwords[0] != passwords[1]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", password) for password in passwords), passwords


def test_make_install_keeps_an_existing_env(tmp_path):
    needs_venv()
    project = project_copy(tmp_path)
    (project / ".env").write_text("DEBUG=on\n")
    proc = make("install", f"VENV={ROOT / '.venv'}", cwd=project, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (project / ".env").read_text() == "DEBUG=on\n"


def test_make_help_prints_no_colour_codes_when_not_on_a_terminal():
    proc = make("help", env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "populate" in proc.stdout and "\x1b" not in proc.stdout


def test_make_help_shows_the_defaults_the_makefile_uses():
    makefile = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(N|DIRTY) \?= (\S+)$", makefile, re.MULTILINE))
    help_text = make("help", env=clean_env()).stdout
    [populate] = [line for line in help_text.splitlines() if line.strip().startswith("populate ")]
    assert f"default N={defaults['N']};" in populate
    assert f"default DIRTY={defaults['DIRTY']})" in populate
    assert f"N={defaults['N']} DIRTY={defaults['DIRTY']} " in help_text


# Tests write only to temporary directories.


def project_output() -> set[Path]:
    return {path for name in ("reports", "backups") for path in (ROOT / name).rglob("*")}


def test_the_test_run_writes_reports_and_backups_outside_the_project():
    for directory in (settings.REPORT_DIR, settings.BACKUP_DIR):
        assert not Path(directory).resolve().is_relative_to(ROOT), directory


def test_a_copy_started_by_a_test_writes_its_report_outside_the_project(fresh_database_url):
    scratch_reports = Path(os.environ["TEST_OUTPUT_DIR"]) / "reports"
    before, scratch_before = project_output(), set(scratch_reports.glob("*"))
    populated = manage(
        "populate_fake_user_bulk", "200", "--dirty", "0.2", "--seed", "1", "--migrate",
        url=fresh_database_url,
    )  # fmt: skip
    assert populated.returncode == 0, populated.stderr
    # Migration 0002 with rejected rows: it writes a report, as when the test database is made.
    copied = manage("migrate", url=fresh_database_url, USER_COPY_SKIP_INVALID="on")
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert project_output() == before
    assert set(scratch_reports.glob("*")) - scratch_before  # the report was written, there
