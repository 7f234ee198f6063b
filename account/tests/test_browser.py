"""In headless Chromium, against gunicorn: migrated users log in with their old password."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.test import override_settings

from account.models import NewUser

from .conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install chromium and chromium-driver (see .ci/run)")
    pytest.skip(
        "Chromium or ChromeDriver is missing: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )


@pytest.fixture
def server():
    """gunicorn, as the container runs it, on a free port, DEBUG off.

    The test settings add the MD5 hasher the fixtures' password hashes use (a real project
    keeps every hasher its legacy hashes use, as config/settings.py does).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(
        PORT=port,
        WEB_CONCURRENCY=2,
        DEBUG="off",
        SECRET_KEY="browser-test-key-" + "q" * 50,
        ALLOWED_HOSTS="127.0.0.1",
        # Plain HTTP on loopback: the settings .env.example documents for local runs.
        SECURE_SSL_REDIRECT="off",
        SESSION_COOKIE_SECURE="off",
        CSRF_COOKIE_SECURE="off",
    )
    env["STATIC_ROOT"] = str(ROOT / "staticfiles")
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--no-input", "-v0"],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    gunicorn = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen(
        [gunicorn, "--config", "config/gunicorn.py", "config.wsgi"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/health/", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=15)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def log_in(browser, server, username, password):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/login/")
    browser.find_element(By.ID, "id_username").send_keys(username)
    browser.find_element(By.ID, "id_password").send_keys(password)
    browser.find_element(By.ID, "login-submit").click()


def test_migrated_users_log_in_in_a_real_browser(run, dirty_legacy, server, browser):
    from selenium.webdriver.common.by import By

    # The users come through the data migration itself: back to 0001, then forward.
    run("migrate", "account", "0001")
    with override_settings(USER_COPY_SKIP_INVALID=True):
        run("migrate", "account")
    user = NewUser.objects.get(pk=dirty_legacy["clean"][6].pk)
    admin = NewUser.objects.get(pk=dirty_legacy["admin"].pk)

    log_in(browser, server, user.username, "wrong-password")
    assert "didn't match" in browser.find_element(By.ID, "login-error").text

    log_in(browser, server, user.username, "old-secret")
    assert browser.find_element(By.ID, "username").text == user.username
    assert user.full_name in browser.find_element(By.ID, "greeting").text
    assert "updated" in browser.find_element(By.ID, "profile").text

    browser.delete_all_cookies()
    log_in(browser, server, admin.username, "old-secret")
    # Wait for the account page: the session cookie is set when the login response arrives.
    assert browser.find_element(By.ID, "username").text == admin.username
    browser.get(f"{server}/admin/account/newuser/")
    assert "Select user to change" in browser.page_source
    assert admin.username in browser.page_source
