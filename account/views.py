"""The few pages of the demo: home, the signed-in user's account, status and health."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.db.utils import DatabaseError
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache

from .cutover import last_cutover
from .models import NewUser, OperationLog, Profile, User


def home(request):
    return redirect("account:me" if request.user.is_authenticated else "login")


@login_required
def me(request):
    # By id: the signed-in user is a NewUser, or a legacy User in deploy 1 (same ids).
    profile = Profile.objects.filter(user_id=request.user.pk).first()
    return render(request, "account/me.html", {"profile": profile})


@never_cache
def status(request):
    """Counts and the last runs; personal data never appears here, and counts only to staff."""
    context = {"show_counts": request.user.is_authenticated and request.user.is_staff}
    if context["show_counts"]:
        context["legacy_users"] = User.objects.count()
        context["new_users"] = NewUser.objects.count()
        context["auth_user_model"] = settings.AUTH_USER_MODEL
        context["last_cutover"] = last_cutover()
    context["last_copy"] = OperationLog.objects.filter(kind=OperationLog.Kind.COPY).first()
    context["last_backup"] = OperationLog.objects.filter(kind=OperationLog.Kind.BACKUP).first()
    return render(request, "account/status.html", context)


@never_cache
def health(request):
    """200 when the database answers a query, 503 otherwise."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        first_line = (str(exc).strip().splitlines() or ["error"])[0]
        return JsonResponse({"status": "error", "database": first_line}, status=503)
    return JsonResponse({"status": "ok", "database": "ok"})
