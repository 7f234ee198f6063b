"""Test settings: the real settings with a fast password hasher, writing to a temporary directory.

The database stays whatever DATABASE_URL names (PostgreSQL in CI), else SQLite.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-0123456789abcdef")
# The tests run on the defaults and what they set, never on a developer's .env.
os.environ["READ_DOT_ENV"] = "off"

# Reports and backups of a test run (the copy that runs when the test database is created
# writes one) go to a temporary directory, removed at exit, never to the project's reports/
# or backups/. The test run makes it; the subprocesses it starts inherit it through the
# environment, and honour a REPORT_DIR or BACKUP_DIR that a test gives them.
if not os.environ.get("TEST_OUTPUT_DIR"):
    os.environ["TEST_OUTPUT_DIR"] = tempfile.mkdtemp(prefix="accounts-tests-")
    atexit.register(shutil.rmtree, os.environ["TEST_OUTPUT_DIR"], ignore_errors=True)
    os.environ.pop("REPORT_DIR", None)  # a developer's shell never decides where tests write
    os.environ.pop("BACKUP_DIR", None)
os.environ.setdefault("REPORT_DIR", os.path.join(os.environ["TEST_OUTPUT_DIR"], "reports"))
os.environ.setdefault("BACKUP_DIR", os.path.join(os.environ["TEST_OUTPUT_DIR"], "backups"))

from .settings import *  # noqa: E402,F403
from .settings import BASE_DIR, DATABASES, PASSWORD_HASHERS  # noqa: E402

# Hash test passwords fast, but keep every production hasher so old hashes still verify.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher", *PASSWORD_HASHERS]

# A SQLite test database in a file, not in memory, so tests can start real subprocesses
# (a killed copy, two copies at once, gunicorn) against it.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "test_db.sqlite3")}

SECURE_SSL_REDIRECT = False
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
