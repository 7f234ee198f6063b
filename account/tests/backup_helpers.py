"""What the backup tests compare, computed with Django's own API (not the backup's queries).

Also run in subprocesses against other databases:
`manage("shell", "-c", "from account.tests.backup_helpers import print_rights; print_rights()")`.
"""

import hashlib
import json

from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction

from account.backup import backed_up_models
from account.models import NewUser, User

NATURAL = (Group, Permission, ContentType)


def _fields(model):
    """Every column, but no id for groups and links: a restore gives them this database's ids."""
    return [
        f
        for f in model._meta.concrete_fields
        if not (f.primary_key and (model._meta.auto_created or model is Group))
    ]


def everything() -> dict:
    """Every row of every backed-up table, every column, in primary key order; a group,
    permission or content type as its natural key (their ids differ between databases)."""
    out = {}
    for model in backed_up_models():
        fields = _fields(model)
        rows = []
        for obj in model.objects.order_by("pk"):
            row = []
            for f in fields:
                value = getattr(obj, f.attname)
                if f.is_relation and f.related_model in NATURAL and value is not None:
                    value = getattr(obj, f.name).natural_key()
                row.append(value)
            rows.append(tuple(row))
        out[model._meta.db_table] = rows
    return out


def fingerprint() -> dict:
    """A digest of every backed-up table's rows, for 100,000 users (everything() is slow), in
    one database: the ids of groups and permissions are compared as they are."""
    out = {}
    for model in backed_up_models():
        digest = hashlib.sha256()
        cols = [f.attname for f in _fields(model)]
        for row in model.objects.order_by("pk").values_list(*cols).iterator(chunk_size=10_000):
            digest.update(repr(row).encode())
        out[model._meta.db_table] = (model.objects.count(), digest.hexdigest())
    return out


def wipe() -> None:
    for model in reversed(backed_up_models()):
        model.objects.all().delete()


def rights() -> dict:
    """What each user may do, by natural key: their groups, and every permission they hold
    directly or through a group; and the content type of every admin log entry."""
    out = {}
    for model in (User, NewUser):
        users = model.objects.prefetch_related(
            "user_permissions__content_type", "groups__permissions__content_type"
        )
        for user in users:
            groups = list(user.groups.all())
            perms = {p.natural_key() for p in user.user_permissions.all()}
            perms |= {p.natural_key() for g in groups for p in g.permissions.all()}
            if groups or perms:
                out[f"{model._meta.label}:{user.username}"] = [
                    sorted(g.name for g in groups),
                    sorted(map(list, perms)),
                ]
    from django.contrib.admin.models import LogEntry

    out["admin log"] = [
        [e.object_repr, list(e.content_type.natural_key()) if e.content_type else None]
        for e in LogEntry.objects.order_by("pk").select_related("content_type")
    ]
    return out


def print_rights() -> None:
    print(json.dumps(rights()))


def permission_ids() -> dict:
    return {".".join(p.natural_key()): p.pk for p in Permission.objects.all()}


def print_permission_ids() -> None:
    print(json.dumps(permission_ids()))


def reverse_ids() -> None:
    """Give every permission and content type another id, as installing apps in another order
    does: id i becomes top + 1 - i, so the old ids still exist but name other rows."""
    qn = connection.ops.quote_name
    with transaction.atomic(), connection.cursor() as cursor:
        for table, referenced_by in (
            ("auth_permission", []),
            ("django_content_type", [("auth_permission", "content_type_id")]),
        ):
            cursor.execute(f"SELECT MAX(id) FROM {qn(table)}")
            top = cursor.fetchone()[0]
            for sql in ("{c} = -{c}", "{c} = %s + {c}"):
                params = [top + 1] if "%s" in sql else []
                cursor.execute(f"UPDATE {qn(table)} SET {sql.format(c='id')}", params)
                for other, column in referenced_by:
                    cursor.execute(f"UPDATE {qn(other)} SET {sql.format(c=column)}", params)
