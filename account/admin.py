"""Admin for every model: both user models, NewUser with its profile and addresses inline.

Only the model named by AUTH_USER_MODEL takes writes here; the other one is shown read-only.
Before the cut-over (deploy 1) the legacy model is live and NewUser is the mirror the sync
keeps; after it NewUser is live and the legacy table is read-only (docs/cutover.md).
"""

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .models import Activity, Address, NewUser, Notification, OperationLog, Profile, User


class ProfileInline(admin.StackedInline):
    model = Profile
    can_delete = False


class AddressInline(admin.TabularInline):
    model = Address
    extra = 0


class WritableOnlyWhenLive:
    """Add, change and delete only while this model is the AUTH_USER_MODEL."""

    def _live(self):
        return self.model is get_user_model()

    def has_add_permission(self, request):
        return self._live() and super().has_add_permission(request)

    def has_change_permission(self, request, obj=None):
        return self._live() and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self._live() and super().has_delete_permission(request, obj)


@admin.register(NewUser)
class NewUserAdmin(WritableOnlyWhenLive, UserAdmin):
    inlines = [ProfileInline, AddressInline]
    list_display = ("username", "email", "full_name", "phone_number", "is_staff", "joined_at")
    list_filter = ("is_staff", "is_superuser", "is_active", "groups")
    search_fields = ("username", "email", "full_name")
    ordering = ("id",)
    readonly_fields = ("last_login", "joined_at", "updated_at")
    # The admin's change list must not count a million rows on every page view.
    show_full_result_count = False
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("full_name", "email", "phone_number", "date_of_birth")}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Important dates", {"fields": ("last_login", "joined_at", "updated_at")}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("username", "email", "password1", "password2")}),
    )


@admin.register(User)
class LegacyUserAdmin(WritableOnlyWhenLive, UserAdmin):
    """The old model: editable in deploy 1, read-only once NewUser is the AUTH_USER_MODEL."""

    list_display = ("username", "email", "full_name", "phone_number", "is_staff")
    list_filter = ("is_staff", "is_superuser", "is_active", "groups")
    search_fields = ("username", "email", "full_name")
    ordering = ("id",)
    readonly_fields = ("last_login",)
    show_full_result_count = False
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("full_name", "email", "phone_number", "date_of_birth")}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Important dates", {"fields": ("last_login",)}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("username", "email", "password1", "password2")}),
    )


@admin.register(Profile)
class ProfileAdmin(admin.ModelAdmin):
    list_display = ("user", "updated_at")
    raw_id_fields = ("user",)
    show_full_result_count = False


@admin.register(Address)
class AddressAdmin(admin.ModelAdmin):
    list_display = ("user", "street_address", "city", "country")
    raw_id_fields = ("user",)


@admin.register(Activity)
class ActivityAdmin(admin.ModelAdmin):
    list_display = ("user", "activity_type", "timestamp")
    raw_id_fields = ("user",)


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("user", "message_body", "is_read", "timestamp")
    raw_id_fields = ("user",)


@admin.register(OperationLog)
class OperationLogAdmin(admin.ModelAdmin):
    list_display = ("kind", "ok", "started_at", "finished_at", "message")
    list_filter = ("kind", "ok")
    readonly_fields = ("kind", "ok", "started_at", "finished_at", "summary", "message")
