"""The real stack: build the image, bring up docker-compose.yml with `make up`, run the recipe
inside `web`, log in over the published port, recreate the containers.

Needs a container engine that answers `docker info` (Docker, or podman behind the Docker API)
and `docker compose` (v2). Without one these tests are skipped with the reason; with
REQUIRE_DOCKER=1 in the environment (.ci/run sets it) they fail instead. Each run has its own
project name, a throwaway .env and free ports, and `docker compose down -v` removes its
containers, network and volumes even when a step fails; then the engine is asked for anything
left with the project's label. A command that runs too long is killed with every process it
started (`make up` and its `docker compose up`), so nothing races `down -v`. The image is tagged
`accounts-web` (docker-compose.yml), as `make up` tags it: a build after a code change moves
the tag and leaves the previous image dangling, as every rebuild does (`docker image prune`
removes those).
"""

import http.cookiejar
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from account.fakedata import DEFAULT_PASSWORD

from .conftest import ROOT, assert_clean_failure, run_as_group

pytestmark = pytest.mark.slow

POPULATE = 2000
APP_UID = "10001"  # the Dockerfile's app user
# populate makes 3% of the users inactive: they cannot log in.
ACTIVE_USER = "SELECT username FROM account_newuser WHERE is_active ORDER BY id LIMIT 1"
IMAGE = "accounts-web"  # docker-compose.yml's web image
PROJECT_LABEL = "com.docker.compose.project"


def engine_problem() -> str | None:
    """Why no container engine can run the stack here, or None when one answers."""
    if not shutil.which("docker"):
        return "the docker command is not installed"
    try:
        info = run_as_group(["docker", "info"], timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no container engine answers `docker info` ({last})"
    version = run_as_group(["docker", "compose", "version"], timeout=30)
    if version.returncode != 0:
        return "`docker compose` (Compose v2) is not installed"
    return None


@pytest.fixture(scope="module")
def engine():
    problem = engine_problem()
    if problem is None:
        return
    if os.environ.get("REQUIRE_DOCKER") == "1":
        pytest.fail(f"REQUIRE_DOCKER=1 but {problem}", pytrace=False)
    pytest.skip(f"Docker stack not tested: {problem} (set REQUIRE_DOCKER=1 to fail instead)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_env(**extra) -> dict:
    """A clean environment: nothing of the caller's settings reaches compose or make."""
    keep = ("PATH", "HOME", "LANG", "XDG_RUNTIME_DIR", "DOCKER_HOST", "DOCKER_BUILDKIT",
            "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")  # fmt: skip
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def docker(*args, timeout=60) -> subprocess.CompletedProcess:
    """`docker ARGS`, in the clean environment."""
    return run_as_group(["docker", *args], cwd=ROOT, env=docker_env(), timeout=timeout)


@dataclass
class Stack:
    """One compose project of docker-compose.yml, with its own .env and ports."""

    project: str
    env_file: Path
    port: int
    db_port: int
    up: subprocess.CompletedProcess | None = None
    timings: dict = field(default_factory=dict)
    image_bytes: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return docker_env(
            COMPOSE_PROJECT_NAME=self.project,
            COMPOSE_ENV_FILES=self.env_file,
            PORT=self.port,
            POSTGRES_PORT=self.db_port,
        )

    def run(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return run_as_group(args, cwd=ROOT, env=self.env(), timeout=timeout)

    @contextmanager
    def timed(self, step: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = time.monotonic() - start

    def compose(self, *args, timeout=120) -> subprocess.CompletedProcess:
        base = ("docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "-p", self.project)
        return self.run(*base, "--env-file", str(self.env_file), *args, timeout=timeout)

    def web(self, *args, env=()) -> subprocess.CompletedProcess:
        """Run a command inside the running web container, as the image's user."""
        options = [f"--env={name}" for name in env]
        return self.compose("exec", "-T", *options, "web", *args, timeout=300)

    def sql(self, query: str) -> str:
        proc = self.compose("exec", "-T", "db", "psql", "-U", "postgres", "-d", "accounts",
                            "-tAc", query)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def leftovers(self) -> list[str]:
        """The containers, volumes and networks the engine still holds with this project's label."""
        label = f"label={PROJECT_LABEL}={self.project}"
        found = []
        for kind, listing in (("containers", ("ps", "-aq")), ("volumes", ("volume", "ls", "-q")),
                              ("networks", ("network", "ls", "-q"))):  # fmt: skip
            proc = docker(*listing, "--filter", label)
            if proc.returncode != 0:
                found.append(f"{kind} unknown (`docker {' '.join(listing)}` failed)")
            elif proc.stdout.split():
                found.append(f"{kind} {' '.join(proc.stdout.split())}")
        return found

    def remove(self) -> list[str]:
        """`docker compose down -v`; what went wrong, and anything of the project left behind."""
        try:
            down = self.compose("down", "-v", "--remove-orphans", "--timeout", "5")
            problems = [] if down.returncode == 0 else [f"`down -v` failed: {down.stderr.strip()}"]
        except subprocess.TimeoutExpired:
            problems = ["`down -v` did not end within 120 s"]
        left = self.leftovers()
        if left:
            problems.append(f"project {self.project} left behind: {'; '.join(left)}")
        return problems


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc


def image_size(name: str) -> int | None:
    """The image's size in bytes, as `docker images` counts it; None when it is not there."""
    proc = docker("image", "inspect", name, "--format", "{{.Size}}")
    return int(proc.stdout) if proc.returncode == 0 else None


def report(pytestconfig, line: str) -> None:
    """Write a line to the terminal, past pytest's output capture (CI logs keep it)."""
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if capture and reporter:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}")


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory, pytestconfig):
    """Build the image, `make up` (waits for healthy services), and always `down -v`."""
    port, db_port = free_port(), free_port()
    env_file = tmp_path_factory.mktemp("stack") / ".env"
    env_file.write_text(
        f"SECRET_KEY={secrets.token_urlsafe(50)}\n"
        f"POSTGRES_PASSWORD={secrets.token_urlsafe(16)}\n"
        f"PORT={port}\nPOSTGRES_PORT={db_port}\n"
        f"CSRF_TRUSTED_ORIGINS=http://127.0.0.1:{port}\n"
        # Plain HTTP on localhost, as .env.example has it.
        "SECURE_SSL_REDIRECT=off\nSESSION_COOKIE_SECURE=off\nCSRF_COOKIE_SECURE=off\n"
        "SECURE_HSTS_SECONDS=0\n"
    )
    stack = Stack(f"accounts-test-{uuid.uuid4().hex[:8]}", env_file, port, db_port)
    started = time.monotonic()
    try:
        with stack.timed("build"):
            ok(stack.compose("build", "web", timeout=900))
        stack.image_bytes = image_size(IMAGE)
        with stack.timed("make up"):
            stack.up = ok(stack.run("make", "-s", "up", timeout=300))
        yield stack
    finally:
        with stack.timed("down -v"):
            problems = stack.remove()
        stack.timings["all"] = time.monotonic() - started
        figures = ", ".join(f"{step} {secs:.1f} s" for step, secs in stack.timings.items())
        size = f"{stack.image_bytes / 1e6:.0f} MB" if stack.image_bytes else "not built"
        report(pytestconfig, f"Docker stack timings: {figures}; image {IMAGE}: {size}")
        assert not problems, "\n".join(problems)


def test_a_command_that_times_out_is_killed_with_every_process_it_started():
    """As `make up` and the `docker compose up` it starts: nothing is left to race `down -v`."""
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        run_as_group(["sh", "-c", "sleep 600 & echo $!; wait"], timeout=1)
    child = int(timeout.value.output)
    try:
        deadline = time.monotonic() + 5
        while is_running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_running(child), "the command's child survived the timeout"
    finally:
        if is_running(child):
            os.kill(child, signal.SIGKILL)


def is_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (killed, waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_make_up_waits_until_every_service_is_healthy_and_prints_the_url(stack):
    assert f"http://127.0.0.1:{stack.port}/" in stack.up.stdout
    ps = ok(stack.compose("ps", "--format", "json"))
    services = [json.loads(line) for line in ps.stdout.splitlines() if line.strip()]
    assert {s["Service"]: s["Health"] for s in services} == {
        "db": "healthy", "web": "healthy", "sync": "healthy",
    }  # fmt: skip


def test_health_answers_on_the_published_port(stack):
    with urllib.request.urlopen(f"{stack.url}/health/", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "database": "ok"}


def test_gunicorn_runs_as_the_non_root_app_user(stack):
    assert ok(stack.web("stat", "-c", "%u", "/proc/1")).stdout.strip() == APP_UID


def test_gunicorn_starts_without_errors(stack):
    logs = ok(stack.compose("logs", "--no-color", "web")).stdout
    assert "Listening at: http://0.0.0.0:8000" in logs
    bad = re.search(r"\[ERROR\]|Permission denied|Traceback", logs)
    # The lines around the first match: the whole log would be cut short by pytest.
    assert not bad, logs[max(0, bad.start() - 600) : bad.start() + 2400]


def test_the_image_holds_only_what_the_container_runs(stack):
    listing = ok(stack.web("sh", "-c", "cd /app && ls -A . scripts config account")).stdout
    tops = dict(re.findall(r"^(\S+):\n(.*?)(?:\n\n|\Z)", listing, re.S | re.M))
    assert set(tops["."].split()) == {
        "account", "backups", "config", "manage.py", "reports", "requirements.txt", "scripts",
        "staticfiles",
    }  # fmt: skip
    assert set(tops["scripts"].split()) == {"backup.py", "entrypoint.sh", "restore.py"}
    assert "test_settings.py" not in tops["config"].split()
    assert "tests" not in tops["account"].split()


@dataclass
class Flow:
    preflight: subprocess.CompletedProcess
    backup: Path


@pytest.fixture(scope="module")
def flow(stack):
    """The recipe inside web: populate (2% dirty), pre-flight, copy with the opt-in policy,
    re-sync, backup."""
    with stack.timed("recipe inside web"):
        return run_the_recipe(stack)


def run_the_recipe(stack: Stack) -> Flow:
    ok(stack.web("python", "manage.py", "populate_fake_user_bulk", str(POPULATE), "--dirty",
                 "0.02", "--migrate"))  # fmt: skip
    preflight = stack.web("python", "manage.py", "check_user_migration")
    skip = ["USER_COPY_SKIP_INVALID=on"]
    ok(stack.web("python", "manage.py", "migrate", "--no-input", env=skip))
    ok(stack.web("python", "manage.py", "copy_users", "--skip-invalid"))
    before = set(ok(stack.web("ls", "/app/backups")).stdout.split())
    ok(stack.web("python", "scripts/backup.py"))
    new = set(ok(stack.web("ls", "/app/backups")).stdout.split()) - before
    assert len(new) == 1, new
    return Flow(preflight=preflight, backup=Path("/app/backups") / new.pop())


def test_the_preflight_refuses_the_dirty_legacy_rows(flow):
    output = flow.preflight.stdout + flow.preflight.stderr
    assert flow.preflight.returncode != 0, output
    assert "cannot be synced" in output and "Traceback" not in output


def test_every_legacy_user_is_copied_or_listed_in_the_copy_report(stack, flow):
    assert stack.sql("SELECT count(*) FROM account_user") == str(POPULATE)
    left = int(stack.sql("SELECT count(*) FROM account_user u WHERE NOT EXISTS "
                         "(SELECT 1 FROM account_newuser n WHERE n.id = u.id)"))  # fmt: skip
    assert 0 < left < POPULATE * 0.05
    report = ok(stack.web("sh", "-c", "ls -t /app/reports/user-copy-*.csv | head -n 1")).stdout
    lines = ok(stack.web("cat", report.strip())).stdout.splitlines()
    assert len(lines) - 1 == left  # a header, then one line per row left behind


def test_the_sync_service_follows_and_stops_cleanly(stack, flow):
    """It waited for the migrations, then followed; the recipe's rejected rows (default
    policy) make its syncs refuse, said once; `docker compose stop` ends it with status 0."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = ok(stack.compose("logs", "--no-color", "sync")).stdout
        if "the sync refused" in logs:
            break
        stack.sql("UPDATE account_user SET full_name = full_name || '.' WHERE id = "
                  "(SELECT min(id) FROM account_user)")  # fmt: skip
        time.sleep(1)
    assert "Following the change log" in logs, logs
    assert logs.count("the sync refused") == 1 and "Traceback" not in logs, logs
    ok(stack.compose("stop", "sync", timeout=60))
    ps = ok(stack.compose("ps", "-a", "--format", "json", "sync")).stdout
    (service,) = [json.loads(line) for line in ps.splitlines() if line.strip()]
    assert service["ExitCode"] == 0, service
    assert "Follower stopped (SIGTERM)" in ok(stack.compose("logs", "--no-color", "sync")).stdout


def test_the_backup_is_mode_0600_and_owned_by_the_app_user(stack, flow):
    assert ok(stack.web("stat", "-c", "%a %u", str(flow.backup))).stdout.split() == ["600", APP_UID]


class Browser:
    """Cookies kept between requests; a POST carries the Origin header, as browsers send it."""

    def __init__(self, stack: Stack):
        self.url = stack.url
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> str:
        with self.opener.open(f"{self.url}{path}", timeout=10) as response:
            return response.read().decode()

    def post(self, path: str, fields: dict) -> tuple[str, str]:
        """The final URL (after redirects) and the page."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=urllib.parse.urlencode(fields).encode(),
            headers={"Origin": self.url},
        )  # fmt: skip
        with self.opener.open(request, timeout=30) as response:
            return response.geturl(), response.read().decode()


def log_in(stack: Stack, username: str, password: str) -> tuple[str, str]:
    """Log in through /login/ as a browser does (CSRF cookie, token and Origin header); the
    final URL and page."""
    browser = Browser(stack)
    form = browser.get("/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    fields = {"csrfmiddlewaretoken": token, "username": username, "password": password}
    return browser.post("/login/", fields)


def test_a_migrated_user_logs_in_with_the_populate_password_over_the_published_port(stack, flow):
    username = stack.sql(ACTIVE_USER)
    url, page = log_in(stack, username, DEFAULT_PASSWORD)
    assert url == f"{stack.url}/account/me/"
    assert username in page


def test_a_wrong_password_does_not_log_in(stack, flow):
    username = stack.sql(ACTIVE_USER)
    url, _ = log_in(stack, username, "not-" + DEFAULT_PASSWORD)
    assert url == f"{stack.url}/login/"


def test_a_login_post_without_the_csrf_token_is_refused_with_403(stack, flow):
    browser = Browser(stack)
    browser.get("/login/")  # the CSRF cookie, but the form's token is left out
    fields = {"username": stack.sql(ACTIVE_USER), "password": DEFAULT_PASSWORD}
    with pytest.raises(urllib.error.HTTPError) as refused:
        browser.post("/login/", fields)
    assert refused.value.code == 403
    assert "CSRF verification failed" in refused.value.read().decode()


TABLES = ("account_user", "account_newuser", "account_profile")


@dataclass
class Restart:
    counts: dict
    containers: list


@pytest.fixture(scope="module")
def restarted(stack, flow) -> Restart:
    """`make down` (removes the containers) then `make up`; the row counts and containers before."""
    before = Restart(counts={name: stack.sql(f"SELECT count(*) FROM {name}") for name in TABLES},
                     containers=ok(stack.compose("ps", "-q")).stdout.split())  # fmt: skip
    with stack.timed("make down, make up"):
        ok(stack.run("make", "-s", "down"))
        ok(stack.run("make", "-s", "up", timeout=300))
    return before


def test_users_and_backups_survive_make_down_and_make_up(stack, flow, restarted):
    """The containers are new; only the named volumes kept the data."""
    assert set(ok(stack.compose("ps", "-q")).stdout.split()).isdisjoint(restarted.containers)
    assert {name: stack.sql(f"SELECT count(*) FROM {name}") for name in TABLES} == restarted.counts
    assert ok(stack.web("ls", str(flow.backup))).returncode == 0


def test_a_migrated_user_still_logs_in_after_make_down_and_make_up(stack, restarted):
    username = stack.sql(ACTIVE_USER)
    url, page = log_in(stack, username, DEFAULT_PASSWORD)
    assert url == f"{stack.url}/account/me/"
    assert username in page


def test_make_up_names_a_port_already_in_use_and_the_variable_to_change(engine, tmp_path):
    (tmp_path / ".env").write_text("SECRET_KEY=x\nPOSTGRES_PASSWORD=x\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = Stack(f"accounts-test-{uuid.uuid4().hex[:8]}", tmp_path / ".env", port, free_port())
        try:
            proc = stack.run("make", "-s", "up", timeout=300)
        finally:  # had the check let it through, compose would have started the stack
            problems = stack.remove()
    assert not problems, "\n".join(problems)
    assert proc.returncode != 0
    assert f"Port {port} on 127.0.0.1 is already in use: set PORT in .env" in proc.stderr
    assert "Building" not in proc.stdout + proc.stderr  # refused before compose started


def postgres_db_container(name: str, port: int) -> subprocess.CompletedProcess:
    """`make postgresDBContainer` with the container and volume both called NAME."""
    env = docker_env(POSTGRES_USER="postgres", POSTGRES_PASSWORD="pw", POSTGRES_DB="accounts",
                     POSTGRES_PORT=port)  # fmt: skip
    command = ["make", "-s", "postgresDBContainer", f"POSTGRES_CONTAINER={name}",
               f"POSTGRES_VOLUME={name}"]  # fmt: skip
    return run_as_group(command, cwd=ROOT, env=env, timeout=180)


def remove_container(name: str) -> None:
    """Remove the container NAME and the volume NAME, and check that the engine has neither."""
    docker("rm", "-f", "-v", name)
    docker("volume", "rm", name)
    for listing in (("ps", "-aq"), ("volume", "ls", "-q")):
        left = ok(docker(*listing, "--filter", f"name=^{name}$"))
        assert left.stdout.split() == [], f"{name} left behind: {left.args}"


def test_make_postgres_db_container_starts_postgresql_on_the_chosen_port(engine):
    import psycopg

    name, port = f"accounts-test-pg-{uuid.uuid4().hex[:8]}", free_port()
    try:
        proc = postgres_db_container(name, port)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"@127.0.0.1:{port}/accounts" in proc.stdout
        with psycopg.connect(f"postgres://postgres:pw@127.0.0.1:{port}/accounts") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        remove_container(name)


def test_make_postgres_db_container_refuses_its_container_published_on_another_port(engine):
    """An existing container keeps the port it was created with: starting it would publish
    PostgreSQL elsewhere than POSTGRES_PORT says."""
    name, old, new = f"accounts-test-pg-{uuid.uuid4().hex[:8]}", free_port(), free_port()
    try:
        ok(docker("create", "--name", name, "-e", "POSTGRES_PASSWORD=pw", "-p",
                  f"127.0.0.1:{old}:5432", "-v", f"{name}:/var/lib/postgresql/data",
                  "postgres:15-bookworm"))  # fmt: skip
        proc = postgres_db_container(name, new)
        state = ok(docker("inspect", "--format", "{{.State.Status}}", name)).stdout.strip()
    finally:
        remove_container(name)
    assert_clean_failure(
        proc, f"The container {name} publishes 127.0.0.1:{old}, not POSTGRES_PORT={new}"
    )
    assert len([line for line in proc.stderr.splitlines() if not line.startswith("make")]) == 1
    assert state == "created"  # never started
