from django.urls import path

from scans.consumers import ScanConsumer, ScanListConsumer
from vllm_control.consumers import ServerStatusConsumer

websocket_urlpatterns = [
    path("ws/scans/", ScanListConsumer.as_asgi()),
    path("ws/scans/<int:scan_id>/", ScanConsumer.as_asgi()),
    path("ws/server/", ServerStatusConsumer.as_asgi()),
]
