from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from ocrsite.metrics import metrics_view
from scans import metrics as scan_metrics  # noqa: F401 - registers the pipeline's metrics
from vllm_control import metrics as server_metrics  # noqa: F401 - registers the model servers' metrics

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="scans:list", permanent=False)),
    # Browsers ask for /favicon.ico where a page names no icon (JSON answers, downloads).
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("scans/", include("scans.urls")),
    path("settings/", include("vllm_control.urls")),
    path("", include("api.urls")),  # /api/v1/ and the API tokens page
]
