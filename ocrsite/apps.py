from django.apps import AppConfig


class OcrsiteConfig(AppConfig):
    """The project package as an app, for its composition-level commands (`manage.py serve`)."""

    name = "ocrsite"
    verbose_name = "ocrsite"
