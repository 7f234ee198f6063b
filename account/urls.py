from django.urls import path

from . import views

app_name = "account"
urlpatterns = [
    path("me/", views.me, name="me"),
]
