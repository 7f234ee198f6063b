"""What Django's DEBUG error page and error e-mails may show of the settings and environment."""

import re

from django.views.debug import SafeExceptionReporterFilter


class ReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, also hiding database URLs (`DATABASE_URL`, `BENCH_DATABASE_URL`, ...).

    The error page lists the settings and the request's META, which holds the whole process
    environment under `runserver` (`make run` turns DEBUG on): Django hides names containing
    PASS, KEY, SECRET, TOKEN ..., but not DATABASE_URL, whose value holds the password.
    """

    hidden_settings = re.compile(
        SafeExceptionReporterFilter.hidden_settings.pattern + "|URL|DATABASE|DSN", flags=re.I
    )
