"""Test settings: the real settings with a fast password hasher.

The database stays whatever DATABASE_URL names (PostgreSQL in CI), else SQLite.
"""

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-0123456789abcdef")
# The tests run on the defaults and what they set, never on a developer's .env.
os.environ["READ_DOT_ENV"] = "off"

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
