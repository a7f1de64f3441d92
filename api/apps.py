from django.apps import AppConfig


class ApiConfig(AppConfig):
    """The REST API, its tokens and webhooks: a thin edge over scans and vllm_control."""

    name = "api"
    verbose_name = "API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # These import models, which are loaded only after every app config.
        from api import receivers, schema, targets  # noqa: F401
        from scans.signals import scan_finished

        targets.allow_list()  # a malformed OCRSITE_WEBHOOK_ALLOWED_HOSTS fails at start-up
        scan_finished.connect(receivers.on_scan_finished, dispatch_uid="api.receivers.on_scan_finished")
