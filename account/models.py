"""The legacy user model, the new user model and the models that hang off the new one."""

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import Group, Permission, PermissionsMixin
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from phonenumber_field.modelfields import PhoneNumberField

from .managers import LegacyUserManager, NewUserManager


class User(AbstractBaseUser, PermissionsMixin):
    """A user of the old schema, as deployed: email not unique, phone as free text."""

    username = models.CharField(max_length=150, unique=True)
    email = models.EmailField(max_length=254, blank=True)
    full_name = models.CharField(max_length=255, blank=True)
    date_of_birth = models.DateField(null=True, blank=True)
    phone_number = models.CharField(max_length=15, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    # PermissionsMixin's reverse names would clash with NewUser's (fields.E304).
    groups = models.ManyToManyField(
        Group,
        blank=True,
        related_name="legacy_user_set",
        related_query_name="legacy_user",
    )
    user_permissions = models.ManyToManyField(
        Permission,
        blank=True,
        related_name="legacy_user_set",
        related_query_name="legacy_user",
    )

    objects = LegacyUserManager()

    USERNAME_FIELD = "username"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS = ["email"]  # asked by createsuperuser while this is the AUTH_USER_MODEL

    class Meta:
        verbose_name = "legacy user"
        verbose_name_plural = "legacy users"

    def __str__(self):
        return self.username


class NewUser(AbstractBaseUser, PermissionsMixin):
    """A user of the new schema: unique email (any case), E.164 phone, join and update times."""

    # Unique through a constraint in Meta: a unique index, without the extra LIKE index
    # (varchar_pattern_ops) that `unique=True` adds on PostgreSQL and the app never uses.
    username = models.CharField(max_length=150, validators=[UnicodeUsernameValidator()])
    email = models.EmailField(
        max_length=254,
        help_text="Unique regardless of case (enforced by a unique index on LOWER(email)).",
    )
    full_name = models.CharField(max_length=255, blank=True)
    date_of_birth = models.DateField(null=True, blank=True, db_index=True)
    phone_number = PhoneNumberField(
        region="NP", blank=True, help_text="Stored in E.164 form, e.g. +9779841234567."
    )
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False, help_text="Can log into the admin site.")
    joined_at = models.DateTimeField(
        default=timezone.now,
        help_text="For users copied from the legacy table: the time of the copy "
        "(the legacy schema has no join date).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = NewUserManager()

    USERNAME_FIELD = "username"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS = ["email"]

    class Meta:
        verbose_name = "user"
        verbose_name_plural = "users"
        constraints = [
            models.UniqueConstraint(
                fields=["username"],
                name="account_newuser_username_unique",
                violation_error_message="A user with that username already exists.",
            ),
            models.UniqueConstraint(
                Lower("email"),
                name="account_newuser_email_ci_unique",
                violation_error_message="A user with that email already exists.",
            ),
        ]

    def __str__(self):
        return self.username

    def get_full_name(self):
        return self.full_name

    def get_short_name(self):
        return self.full_name.split(" ")[0] if self.full_name else self.username


class Profile(models.Model):
    """Exactly one per user."""

    user = models.OneToOneField(NewUser, on_delete=models.CASCADE, related_name="profile")
    bio = models.TextField(blank=True)
    avatar = models.FileField(upload_to="avatars/", blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"Profile of {self.user_id}"


class Address(models.Model):
    """A postal address; a user may have several."""

    user = models.ForeignKey(NewUser, on_delete=models.CASCADE, related_name="addresses")
    street_address = models.CharField(max_length=255)
    city = models.CharField(max_length=100)
    state = models.CharField(max_length=100, blank=True)
    postal_code = models.CharField(max_length=20, blank=True)
    country = models.CharField(max_length=100, default="Nepal")

    class Meta:
        verbose_name_plural = "addresses"

    def __str__(self):
        return f"{self.street_address}, {self.city}"


class Activity(models.Model):
    """Something a user did, e.g. logged in."""

    user = models.ForeignKey(NewUser, on_delete=models.CASCADE, related_name="activities")
    activity_type = models.CharField(max_length=50)
    timestamp = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name_plural = "activities"

    def __str__(self):
        return f"{self.activity_type} at {self.timestamp:%Y-%m-%d %H:%M}"


class Notification(models.Model):
    """A message for a user."""

    user = models.ForeignKey(NewUser, on_delete=models.CASCADE, related_name="notifications")
    message_body = models.TextField()
    is_read = models.BooleanField(default=False)
    timestamp = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return self.message_body[:50]


class SyncState(models.Model):
    """What the last sync wrote for one user copied from the legacy table: digests, no data.

    The sync compares them with digests of the rows as they are now, so it knows which side
    changed since, whatever wrote it: `save()`, `update()`, `update_fields`, links, raw SQL.
    A new user without a row here was not made by the copy (a signup) and is never touched.
    """

    user_id = models.BigIntegerField(
        primary_key=True, help_text="The same id on both sides: the legacy user and its copy."
    )
    legacy_digest = models.UUIDField(help_text="MD5 of the legacy row and its links when synced.")
    new_digest = models.UUIDField(help_text="MD5 of the new row and its links as the sync left it.")
    synced_at = models.DateTimeField()

    class Meta:
        verbose_name = "sync state"

    def __str__(self):
        return f"user {self.user_id} synced at {self.synced_at:%Y-%m-%d %H:%M}"


class OperationLog(models.Model):
    """One run of a copy, check, backup, restore, cut-over or rollback, shown on the status page."""

    class Kind(models.TextChoices):
        CHECK = "check", "pre-flight check"
        COPY = "copy", "user copy"
        BACKUP = "backup", "backup"
        RESTORE = "restore", "restore"
        CUTOVER = "cutover", "cut-over"
        ROLLBACK = "rollback", "cut-over rollback"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    ok = models.BooleanField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(default=timezone.now)
    summary = models.JSONField(default=dict, help_text="Counts only: no personal data.")
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["-finished_at"]
        indexes = [models.Index(fields=["kind", "-finished_at"], name="account_oplog_kind_idx")]

    def __str__(self):
        return f"{self.get_kind_display()} at {self.finished_at:%Y-%m-%d %H:%M}"


class ChangeLog(models.Model):
    """One write to a user table that a trigger watches, appended in the writer's transaction.

    Side 'new': after the cut-over, triggers on NewUser and its group and permission links add
    a row for the first insert, update or delete of each user (one row per user, so the table
    stays as small as the number of users written). The rollback looks at exactly the users
    named here, not at "every user that differs", and empties it.

    Side 'legacy' (PostgreSQL, `account.changecapture`): before the cut-over, triggers on the
    legacy user table and its links append a row for every write; 'full' rows (user 0) ask the
    next sync to compare every user. `copy_users` syncs the users it reads here and deletes
    the rows it read; 'pending' rows keep the users it rejected (or found in conflict) in view.
    No personal data: ids only.
    """

    class Side(models.TextChoices):
        LEGACY = "legacy", "legacy user table"
        NEW = "new", "NewUser"

    class Op(models.TextChoices):
        INSERT = "insert", "insert"
        UPDATE = "update", "update"
        DELETE = "delete", "delete"
        LINKS = "links", "group or permission links"
        FULL = "full", "compare every user"
        PENDING = "pending", "rejected or in conflict at the last sync"

    id = models.BigAutoField(primary_key=True)
    side = models.CharField(max_length=10, choices=Side.choices)
    user_id = models.BigIntegerField()
    op = models.CharField(max_length=10, choices=Op.choices)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "user change"
        indexes = [models.Index(fields=["side", "user_id"], name="account_changelog_user_idx")]

    def __str__(self):
        return f"{self.op} of {self.side} user {self.user_id}"
