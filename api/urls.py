"""/api/v1/ (the REST API, its schema and docs) and the API tokens page."""

from django.contrib.auth.decorators import login_required
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from api import pages, views
from scans.exports import FORMATS

app_name = "api"

v1 = [
    path("scans/", views.ScansView.as_view(), name="scans"),
    path("scans/<int:scan_id>/", views.ScanView.as_view(), name="scan"),
    path("scans/<int:scan_id>/pages/", views.ScanPagesView.as_view(), name="scan-pages"),
    # One route per format of scans.exports.FORMATS, so a format added there appears here and in the schema.
    *(
        path(f"scans/<int:scan_id>/export.{fmt}", views.export_view(fmt).as_view(), name=f"scan-export-{fmt}")
        for fmt in FORMATS
    ),
    path("scans/<int:scan_id>/cancel/", views.ScanCancelView.as_view(), name="scan-cancel"),
    path("scans/<int:scan_id>/retry/", views.ScanRetryView.as_view(), name="scan-retry"),
    path("server/", views.ServerStatusView.as_view(), name="server"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", login_required(SpectacularSwaggerView.as_view(url_name="api:schema")), name="docs"),
]

urlpatterns = [
    path("api/v1/", include(v1)),
    path("account/api-tokens/", pages.tokens_page, name="tokens"),
    path("account/api-tokens/<int:token_id>/revoke/", pages.revoke, name="revoke-token"),
    path("account/webhook/", pages.webhook, name="webhook"),
]
