"""The few pages of the demo: home, the signed-in user's account, status and health."""

import logging
from datetime import datetime

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.db.utils import DatabaseError
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache

from .cutover import MODELS, last_cutover
from .follower import LogState, log_state
from .models import NewUser, OperationLog, Profile, User

logger = logging.getLogger(__name__)

# Summary keys that do not say a copy changed anything: what it found (a re-sync that copies
# nothing still reports the rows it leaves behind) and how long it took. Any other number
# above zero (copied, groups, normalised_by_kind, updated, deleted, conflicts, ...) does.
NOT_CHANGES = frozenset(
    {
        "pending",
        "already_copied",
        "rejected",
        "rejected_by_reason",
        "seconds",
        "legacy_total",
        "password_algorithms",
        "conflicts",
        "syncs",  # a follower's run (account.follower.Run): its syncs and refusals count
        "refused",  # nothing by themselves
    }
)

# The chart of rejected rows by reason: one bar per reason, drawn on the server as SVG.
CHART_BAR_HEIGHT = 18
CHART_BAR_GAP = 6
CHART_LABEL_WIDTH = 150
CHART_BAR_MAX_WIDTH = 300


def home(request):
    return redirect("account:me" if request.user.is_authenticated else "login")


@login_required
def me(request):
    # By id: the signed-in user is a NewUser, or a legacy User in deploy 1 (same ids).
    profile = Profile.objects.filter(user_id=request.user.pk).first()
    return render(request, "account/me.html", {"profile": profile})


def did_something(log: OperationLog) -> bool:
    """Whether a logged copy failed or changed something (a no-op re-sync did neither)."""
    if not log.ok:
        return True
    for key, value in log.summary.items():
        if key in NOT_CHANGES:
            continue
        counts = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(n, int | float) and not isinstance(n, bool) and n for n in counts):
            return True
    return False


def last_copy_that_did_something() -> OperationLog | None:
    """The newest copy that failed or changed something, skipping no-op re-syncs."""
    copies = OperationLog.objects.filter(kind=OperationLog.Kind.COPY).order_by("-finished_at")
    return next((log for log in copies.iterator(chunk_size=100) if did_something(log)), None)


def applied_at(log: OperationLog):
    """When `log`'s run last applied a change: a follower's run says so in its summary (its
    row is also saved when a sync refuses); any other copy, when it finished, if it wrote."""
    if "follower" in log.summary:
        at = log.summary.get("applied_at")
        return datetime.fromisoformat(at) if at else None
    return log.finished_at if log.ok and did_something(log) else None


def last_change_applied():
    """When a sync last wrote to NewUser (the newest `applied_at` among the copies)."""
    copies = OperationLog.objects.filter(kind=OperationLog.Kind.COPY).order_by("-finished_at")
    newest = None
    for log in copies.iterator(chunk_size=100):
        if newest is not None and log.finished_at <= newest:
            break  # no older row applied anything later
        at = applied_at(log)
        if at is not None and (newest is None or at > newest):
            newest = at
    return newest


def change_log():
    """`log_state`, or a line saying why it cannot be read (the page still renders)."""
    try:
        return log_state(MODELS)
    except DatabaseError as exc:
        logger.exception("Status page: the change log could not be read")
        return LogState(f"unknown: the database refused ({type(exc).__name__})", unknown=True)


def rejection_chart(rejected_by_reason: dict[str, int]) -> dict | None:
    """Bars for the status page's SVG chart: one per reason, longest first, scaled to the largest."""
    counts = sorted(
        ((reason, n) for reason, n in rejected_by_reason.items() if n > 0),
        key=lambda item: (-item[1], item[0]),
    )
    if not counts:
        return None
    largest = counts[0][1]
    step = CHART_BAR_HEIGHT + CHART_BAR_GAP
    bars = []
    for i, (reason, n) in enumerate(counts):
        width = max(1, round(CHART_BAR_MAX_WIDTH * n / largest))
        bars.append(
            {
                "reason": reason,
                "count": n,
                "y": i * step,
                "text_y": i * step + CHART_BAR_HEIGHT - 5,
                "width": width,
                "count_x": CHART_LABEL_WIDTH + width + 4,
            }
        )
    return {
        "bars": bars,
        "total": sum(n for _, n in counts),
        "width": CHART_LABEL_WIDTH + CHART_BAR_MAX_WIDTH + 60,
        "height": len(bars) * step,
        "bar_x": CHART_LABEL_WIDTH,
        "label_x": CHART_LABEL_WIDTH - 6,
        "bar_height": CHART_BAR_HEIGHT,
    }


@never_cache
def status(request):
    """That the app is up, to everyone; counts, messages and file names to staff only."""
    is_staff = request.user.is_authenticated and request.user.is_staff
    context = {"is_staff": is_staff}
    if is_staff:
        last_copy = last_copy_that_did_something()
        context.update(
            legacy_users=User.objects.count(),
            new_users=NewUser.objects.count(),
            last_copy=last_copy,
            chart=rejection_chart(last_copy.summary.get("rejected_by_reason") or {})
            if last_copy
            else None,
            last_backup=OperationLog.objects.filter(kind=OperationLog.Kind.BACKUP).first(),
            auth_user_model=settings.AUTH_USER_MODEL,
            last_cutover=last_cutover(),
            last_applied=last_change_applied(),
            log=change_log(),
        )
    return render(request, "account/status.html", context)


@never_cache
def health(request):
    """200 when the database answers a query, 503 otherwise; the cause goes to the log only."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError:
        logger.exception("Health check failed: the database did not answer")
        return JsonResponse({"status": "error", "database": "unavailable"}, status=503)
    return JsonResponse({"status": "ok", "database": "ok"})
