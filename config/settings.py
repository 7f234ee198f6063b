"""Settings for the user-model migration reference app.

One module, driven by environment variables (and by `.env` when present).
`.env.example` documents every variable read here.
"""

from pathlib import Path
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

from config.dburl import mask_password

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# Values from the environment win over .env. The tests and the container set READ_DOT_ENV=off
# so that a developer's .env cannot change what they run.
if env.bool("READ_DOT_ENV", default=True):
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it in the environment or in .env "
            "(see .env.example), or set DEBUG=on for local development."
        )
    SECRET_KEY = "django-insecure-local-development-only"

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "phonenumber_field",
    "account",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"


MALFORMED = (
    "percent-encode the characters / ? # @ in the password (as %2F %3F %23 %40) and check "
    "that the port is a number: postgres://USER:PASSWORD@HOST:PORT/NAME"
)


def database_from_url(url: str) -> dict:
    """Parse DATABASE_URL, refusing anything that is not a PostgreSQL or SQLite URL.

    Every message shows the URL with its password masked, and never the parser's own message:
    these land in terminals and CI logs, and a parser names the part it choked on, which for a
    password holding an unescaped "/" is the start of the password.
    """
    shown = mask_password(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        raise ImproperlyConfigured(f"DATABASE_URL {shown!r} is malformed: {MALFORMED}") from None
    if parts.scheme not in {"postgres", "postgresql", "pgsql", "sqlite"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL {shown!r} is not a database URL this app understands: "
            "use postgres://USER:PASSWORD@HOST:PORT/NAME or sqlite:///path/to/file.sqlite3"
        )
    if parts.scheme != "sqlite":
        if not parts.hostname:  # e.g. "postgres:/user:password@host/name", a slash missing
            raise ImproperlyConfigured(
                f"DATABASE_URL {shown!r} names no host: use postgres://USER:PASSWORD@HOST:PORT/NAME"
            )
        if "@" in parts.path + parts.query + parts.fragment:  # the password held / ? or #
            raise ImproperlyConfigured(f"DATABASE_URL {shown!r} is malformed: {MALFORMED}")
    try:
        config = environ.Env.db_url_config(url)
    except ValueError:
        raise ImproperlyConfigured(f"DATABASE_URL {shown!r} is malformed: {MALFORMED}") from None
    if not config.get("NAME"):
        raise ImproperlyConfigured(f"DATABASE_URL {shown!r} names no database")
    if config["ENGINE"] == "django.db.backends.postgresql":
        # Fail fast when the server is down instead of hanging.
        config.setdefault("OPTIONS", {})["connect_timeout"] = env.int("DATABASE_CONNECT_TIMEOUT", 5)
    else:
        # IMMEDIATE: a writer takes the lock when its transaction starts, so two copies at
        # once queue up instead of failing half-way with "database is locked".
        config.setdefault("OPTIONS", {}).update(transaction_mode="IMMEDIATE", timeout=30)
    return config


# Zero-setup default: a SQLite file in the project. Production: PostgreSQL via DATABASE_URL.
DATABASE_URL = env.str("DATABASE_URL", default="") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
DATABASES = {"default": database_from_url(DATABASE_URL)}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The DEBUG error page and error e-mails hide DATABASE_URL (its password) too.
DEFAULT_EXCEPTION_REPORTER_FILTER = "config.debug.ReporterFilter"

# Deploy 1 of a cut-over runs with account.User (the old model is live); deploy 2 with
# account.NewUser. docs/cutover.md tells the whole story.
AUTH_USER_MODEL = env.str("AUTH_USER_MODEL", default="account.NewUser")
if AUTH_USER_MODEL not in {"account.NewUser", "account.User"}:
    raise ImproperlyConfigured(
        f"AUTH_USER_MODEL={AUTH_USER_MODEL!r}: use account.NewUser (the default) or account.User"
    )

# Every hasher a legacy Django project's hashes may use, or those users can no longer log in
# (argon2 and bcrypt need Django's `argon2` and `bcrypt` extras, in requirements.txt). The first
# one hashes new passwords; the weak legacy ones come last, so a login upgrades the hash.
# The pre-flight rejects a hash no hasher here recognises (`password_unknown_hasher`).
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    "django.contrib.auth.hashers.BCryptPasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
    "django.contrib.auth.hashers.MD5PasswordHasher",
    "account.hashers.SHA1PasswordHasher",
    "account.hashers.UnsaltedSHA1PasswordHasher",
    "account.hashers.UnsaltedMD5PasswordHasher",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "account:me"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "staticfiles")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
MEDIA_ROOT = env.path("MEDIA_ROOT", default=BASE_DIR / "media")

PHONENUMBER_DEFAULT_REGION = "NP"

# Where the data-migration reports and the JSON backups go.
REPORT_DIR = env.path("REPORT_DIR", default=BASE_DIR / "reports")
BACKUP_DIR = env.path("BACKUP_DIR", default=BASE_DIR / "backups")
# The key of the backups' HMAC (account/backup.py): keep it with the backups' secrets; a
# restore refuses a file made with another key. Unset or empty: SECRET_KEY.
BACKUP_KEY = env.str("BACKUP_KEY", default="") or SECRET_KEY

# Policy of the user copy (migration 0002 and `copy_users`): by default one bad legacy row
# stops the whole copy. With this on, valid rows are copied and bad ones stay behind, reported.
USER_COPY_SKIP_INVALID = env.bool("USER_COPY_SKIP_INVALID", default=False)

# Production hardening; `manage.py check --deploy` is clean when DEBUG is off.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_REDIRECT_EXEMPT = [r"^health/$"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="WARNING")},
}
