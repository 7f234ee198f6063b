"""URL configuration: the admin, Django's login views and the account pages."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from account import views

urlpatterns = [
    path("", views.home, name="home"),
    path("health/", views.health, name="health"),
    path("status/", views.status, name="status"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("account/", include("account.urls")),
    path("admin/", admin.site.urls),
]
