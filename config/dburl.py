"""Database URLs in messages: every message that shows a URL shows it through `mask_password`.

Settings and `config/cli.py` import it; it imports nothing from Django, so it works while
the settings are still failing to load.
"""

import re

MASK = "***"
# ?password=... : libpq and django-environ both accept a password as a query option.
_QUERY_PASSWORD = re.compile(r"(?i)([?&;](?:password|passwd|pass|pwd)=)[^&;#]*")
# user:password@ anywhere, for text that is not a URL (e.g. a scheme missing its "://").
_USERINFO = re.compile(r"([^/:@\s]*):[^@\s]*@")


def mask_password(url: str) -> str:
    """`url` with its password replaced by ***, keeping what helps diagnosis (user, host, name).

    Malformed URLs are the ones that end up in error messages, so this never parses strictly:
    everything between "://" and the last "@" is the user and password, even when the
    password holds an unescaped "@" or "/". It may hide too much, never too little.
    """
    scheme, sep, rest = url.partition("://")
    if sep:
        userinfo, at, hostinfo = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostinfo}"
        url = f"{scheme}://{rest}"
    else:
        url = _USERINFO.sub(rf"\1:{MASK}@", url)
    return _QUERY_PASSWORD.sub(rf"\1{MASK}", url)


# A word of a message: what lies between spaces, quotes and brackets.
_WORD = re.compile(r"[^\s\"'()<>\[\],;]+")


def mask_passwords_in(text: str) -> str:
    """`text` (an error message) with every URL or `user:password@` in it masked.

    For messages whose text comes from elsewhere (a driver, a server): the server names the
    database it was asked for, and a malformed URL can put a password into that name.
    """
    return _WORD.sub(lambda m: mask_password(m[0]) if _has_secret(m[0]) else m[0], text)


def _has_secret(word: str) -> bool:
    # The placeholder in the app's own advice ("postgres://USER:PASSWORD@HOST...") stays.
    return "@" in word and ":PASSWORD@" not in word
