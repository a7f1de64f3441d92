from django.apps import AppConfig
from django.contrib.auth.signals import user_logged_out

from ocrsite.live import close_sockets_on_logout
from vllm_control import cpu_engines, demand


class OcrsiteConfig(AppConfig):
    """The project package as an app, for its composition-level commands (`manage.py serve`) and wiring."""

    name = "ocrsite"
    verbose_name = "ocrsite"

    def ready(self) -> None:
        user_logged_out.connect(close_sockets_on_logout, dispatch_uid="ocrsite.live.close_sockets_on_logout")

        from scans import selectors
        from scans.pipeline import builtin, languages
        from vllm_control.config import resolve_config

        # The settings (vllm_control) offer and check the CPU engines' languages without importing scans.
        cpu_engines.register(
            cpu_engines.CPUEngineSupport(
                default_engine=builtin.DEFAULT_CPU_ENGINE,
                installed_languages=languages.installed_languages,
                validate_language=languages.validate_language,
                adding_a_language=languages.adding_a_language,
            )
        )
        # An idle Local server stays up while pages wait for it, and an idle-stopped one starts for them.
        demand.register(lambda: selectors.pages_waiting_for_model_server(mode=resolve_config().mode))
