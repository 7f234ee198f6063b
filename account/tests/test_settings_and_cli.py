"""Settings from the environment, and one-line errors instead of tracebacks."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.settings import database_from_url

from .conftest import assert_clean_failure, manage, subprocess_env

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
        ("mysql://u@h/db", "is not a database URL this app understands"),
        ("postgres://u@h:notaport/db", "is malformed"),
        ("postgres://u@h:5432/", "names no database"),
    ],
)
def test_malformed_database_url_is_one_clear_line(url, message):
    proc = manage("migrate", url=url)
    assert_clean_failure(proc, "Configuration error", message)
    with pytest.raises(ImproperlyConfigured):
        database_from_url(url)


def test_database_that_is_down_is_one_clear_line():
    # Nothing listens on port 1.
    proc = manage("migrate", url="postgres://postgres:secret@127.0.0.1:1/nowhere")
    assert_clean_failure(proc, "Database error (postgres://…@127.0.0.1:1/nowhere)")
    assert "secret" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


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
@pytest.mark.parametrize("target", ["migrate", "populate", "migrate-data", "backup"])
def test_make_targets_fail_in_one_clear_line(target, url, message):
    import subprocess

    from .conftest import ROOT

    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("make targets run from the project's .venv: run `make install` first")
    proc = subprocess.run(
        ["make", "-s", target], cwd=ROOT, env=subprocess_env(url), capture_output=True, text=True
    )
    assert_clean_failure(proc, message)
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1, proc.stderr
