"""ASGI entry point: HTTP (with static files), WebSockets and the lifespan, behind the request limits."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from api.websocket import BearerTokenWebsocketMiddleware  # noqa: E402
from ocrsite.lifespan import LifespanApp  # noqa: E402
from ocrsite.limits import RequestLimits  # noqa: E402
from ocrsite.routing import websocket_urlpatterns  # noqa: E402

websocket_routes = URLRouter(websocket_urlpatterns)
application = RequestLimits(
    ProtocolTypeRouter(
        {
            "http": ASGIStaticFilesHandler(django_asgi_app),
            # A program's API token in the handshake's Authorization header, else the browser's session.
            "websocket": BearerTokenWebsocketMiddleware(
                websocket_routes, otherwise=AllowedHostsOriginValidator(AuthMiddlewareStack(websocket_routes))
            ),
            "lifespan": LifespanApp(),
        }
    )
)
