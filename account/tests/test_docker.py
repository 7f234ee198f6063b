"""The Docker files without an engine: lint the Dockerfile, validate the compose file, run the
container's entrypoint and exact gunicorn command on the host against the test database, and
the refusals of compose and the Make targets. test_compose_stack.py runs the real stack."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, assert_clean_failure, run_as_group, subprocess_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def compose() -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe").load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_compose_specification():
    proc = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_waits_for_a_healthy_database_and_keeps_secrets_out():
    spec = compose()
    assert spec["services"]["web"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(spec["services"]["db"]["healthcheck"]["test"])
    assert re.fullmatch(r"postgres:\d+[-\w]*", spec["services"]["db"]["image"])
    env = spec["services"]["web"]["environment"]
    assert env["DEBUG"] == "off"
    assert env["SECRET_KEY"].startswith("${SECRET_KEY:?")
    assert spec["services"]["db"]["environment"]["POSTGRES_PASSWORD"].startswith("${")


def variables_the_app_reads() -> set[str]:
    settings = (ROOT / "config" / "settings.py").read_text()
    names = set(re.findall(r'env\.\w+\(\s*"([A-Z_]+)"', settings))
    names |= set(
        re.findall(r"os\.environ\.get\([\"']([A-Z_]+)", (ROOT / "config/gunicorn.py").read_text())
    )
    names |= set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "scripts/entrypoint.sh").read_text()))
    return names


def test_every_setting_read_from_the_environment_is_in_env_example_and_compose():
    names = variables_the_app_reads()
    assert {"DATABASE_URL", "SECRET_KEY", "DEBUG", "PORT", "DB_WAIT_TIMEOUT"} <= names
    example = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert names - example == set()
    assert names - set(compose()["services"]["web"]["environment"]) == set()


def _dockerfile_json(instruction: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    return json.loads(re.search(rf"^{instruction} (\[.*\])$", text, re.M).group(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_env(**extra):
    """The web service's environment as compose sets it, with this test database."""
    env = subprocess_env(**extra)
    env.update(DEBUG="off", SECRET_KEY="s" * 60, ALLOWED_HOSTS="localhost,127.0.0.1")
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    return env


@pytest.mark.django_db(transaction=True)
def test_entrypoint_and_the_containers_gunicorn_command_serve_health():
    port = _free_port()
    command = [str(ROOT / _dockerfile_json("ENTRYPOINT")[0]), *_dockerfile_json("CMD")]
    env = container_env(PORT=port, WEB_CONCURRENCY=1)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline, body = time.monotonic() + 30, None
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert body == {"status": "ok", "database": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def run_entrypoint_without_a_database(env):
    """Run the entrypoint against a port nothing listens on, this venv's python on PATH."""
    env["DATABASE_URL"] = "postgres://postgres@127.0.0.1:1/nowhere"
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return subprocess.run(
        [str(ROOT / "scripts/entrypoint.sh"), "true"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_entrypoint_gives_up_on_a_missing_database_with_a_clear_message():
    env = container_env(DB_WAIT_TIMEOUT=2)
    proc = run_entrypoint_without_a_database(env)
    assert_clean_failure(proc, "did not accept connections within 2 s")


@pytest.mark.parametrize("password", ["pass/word", "pass#word", "p@ss", "pass%20word"])
def test_entrypoint_refuses_a_postgres_password_that_would_break_the_database_url(password):
    env = container_env(DB_WAIT_TIMEOUT=1, POSTGRES_PASSWORD=password)
    proc = run_entrypoint_without_a_database(env)
    assert_clean_failure(proc, "set POSTGRES_PASSWORD in .env to URL-safe characters only")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_check_deploy_is_clean_with_the_container_settings(tmp_path):
    env = subprocess_env(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    for name, value in compose()["services"]["web"]["environment"].items():
        # Interpolate ${VAR:-default} with its default, as compose does with a production .env.
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        if "${" not in value:
            env[name] = value
    env.update(
        SECRET_KEY=secrets.token_urlsafe(50), DATABASE_URL=f"sqlite:///{tmp_path / 'x.sqlite3'}"
    )
    env.pop("STATIC_ROOT")
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_targets_say_in_one_line_when_there_is_no_engine():
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    proc = subprocess.run(
        ["make", "-s", "postgresDBContainer"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "SQLite default" in proc.stderr and "DATABASE_URL" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # the line, and make's own note


def test_docker_targets_say_in_one_line_when_the_engine_does_not_answer(tmp_path):
    (tmp_path / "docker").write_text("#!/bin/sh\nexec sleep 600\n")  # an engine that hangs
    (tmp_path / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DOCKER_INFO_TIMEOUT": "1"}
    proc = run_as_group(["make", "-s", "up"], cwd=ROOT, env=env, timeout=30)
    assert_clean_failure(proc, "did not answer `docker info` within 1 s")
    assert len(proc.stderr.strip().splitlines()) <= 2  # the line, and make's own note


def duration(text: str) -> float:
    """Seconds in a compose duration such as 1m30s or 60s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_every_healthcheck_gives_a_first_start_a_minute():
    # Podman runs checks every 2 s whatever `interval` says: without a start period, web's
    # 6 retries would give it 12 s, less than the entrypoint waits for the database.
    for name, service in compose()["services"].items():
        assert duration(str(service["healthcheck"].get("start_period", "0s"))) >= 60, name


def test_every_healthcheck_is_a_shell_command_both_engines_run():
    # Podman's Docker API splits ["CMD", ...] arguments on spaces; CMD-SHELL runs the same.
    for name, service in compose()["services"].items():
        assert service["healthcheck"]["test"][0] == "CMD-SHELL", name


def test_the_published_database_port_is_not_5432_and_the_same_everywhere():
    example = re.search(r"^POSTGRES_PORT=(\d+)$", (ROOT / ".env.example").read_text(), re.M)
    makefile = re.search(r"call dotenv,POSTGRES_PORT,(\d+)", (ROOT / "Makefile").read_text())
    (published,) = compose()["services"]["db"]["ports"]
    in_compose = re.search(r"\$\{POSTGRES_PORT:-(\d+)\}", published)
    assert example[1] == makefile[1] == in_compose[1] != "5432"
    assert published.startswith("127.0.0.1:")


def test_the_port_check_names_a_port_in_use_and_the_variable_to_change():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PORT": str(port), "POSTGRES_PORT": str(_free_port())}
        proc = subprocess.run(
            [ROOT / "scripts/check-ports.sh", "--compose", "POSTGRES_PORT", "PORT"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert_clean_failure(proc, f"Port {port} on 127.0.0.1 is already in use: set PORT in .env")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_port_check_passes_free_ports():
    env = {**os.environ, "PORT": str(_free_port()), "POSTGRES_PORT": str(_free_port())}
    proc = subprocess.run(
        [ROOT / "scripts/check-ports.sh", "--compose", "POSTGRES_PORT", "PORT"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_the_port_check_refuses_a_value_that_is_not_a_port():
    env = {**os.environ, "PORT": "80OO"}
    proc = subprocess.run(
        [ROOT / "scripts/check-ports.sh", "--compose", "PORT"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_clean_failure(proc, "PORT=80OO is not a port number: set PORT in .env")


@pytest.mark.parametrize("missing", ["SECRET_KEY", "POSTGRES_PASSWORD"])
def test_compose_refuses_to_start_without_a_secret_and_names_it(missing, tmp_path):
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail("REQUIRE_DOCKER=1 but `docker compose` is not installed", pytrace=False)
        pytest.skip("`docker compose` (Compose v2) is not installed")
    values = {"SECRET_KEY": "s" * 50, "POSTGRES_PASSWORD": "p" * 16}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items() if k != missing))
    env = {k: v for k, v in os.environ.items() if k not in values}
    proc = subprocess.run(
        ["docker", "compose", "--env-file", env_file, "config"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_clean_failure(
        proc, f"required variable {missing} is missing a value: set {missing} in .env"
    )
