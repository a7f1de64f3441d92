from django.apps import AppConfig


class VllmControlConfig(AppConfig):
    name = "vllm_control"
    verbose_name = "vLLM control"
    default_auto_field = "django.db.models.BigAutoField"
