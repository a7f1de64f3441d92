from django.apps import AppConfig
from django.contrib.auth.signals import user_logged_out

from ocrsite.live import close_sockets_on_logout


class OcrsiteConfig(AppConfig):
    """The project package as an app, for its composition-level commands (`manage.py serve`) and wiring."""

    name = "ocrsite"
    verbose_name = "ocrsite"

    def ready(self) -> None:
        user_logged_out.connect(close_sockets_on_logout, dispatch_uid="ocrsite.live.close_sockets_on_logout")
