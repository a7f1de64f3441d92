from django.urls import path

from vllm_control import control_views, server_views, views

app_name = "vllm_control"
urlpatterns = [
    path("", views.settings_page, name="settings"),
    path("server/start/", control_views.start, name="start"),
    path("server/stop/", control_views.stop, name="stop"),
    path("server/restart/", control_views.restart, name="restart"),
    path("server/test/", control_views.test_connection, name="test"),
    path("servers/add/", server_views.model_server, name="add_server"),
    path("servers/<int:pk>/", server_views.model_server, name="server"),
    path("servers/<int:pk>/delete/", server_views.delete_server, name="delete_server"),
]
