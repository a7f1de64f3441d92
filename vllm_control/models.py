from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from vllm_control.redaction import redact_urls

DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"


class Mode(models.TextChoices):
    LOCAL = "local", "Local (ocrsite runs vllm serve)"
    EXTERNAL = "external", "External (an OpenAI-compatible server)"
    BUILTIN = "builtin", "Built-in (CPU)"


class PromptPreset(models.TextChoices):
    MARKDOWN = "markdown", "Markdown (instruct VLMs such as Qwen3-VL)"
    OLMOCR = "olmocr", "olmOCR (YAML front matter)"
    CUSTOM = "custom", "Custom prompt"


class CPUEngine(models.TextChoices):
    """The built-in CPU engines, by the names scans.pipeline.builtin.CPU_ENGINES gives them (a test keeps
    the two equal: this app cannot import that one)."""

    TESSERACT = "tesseract", "Tesseract (100+ languages, word boxes)"
    RAPIDOCR = "rapidocr", "RapidOCR (Chinese and English)"


DEFAULT_LANGUAGE = "eng"  # scans.pipeline.languages.DEFAULT_LANGUAGE (a test keeps the two equal)


class ImageFormat(models.TextChoices):
    PNG = "png", "PNG"
    JPEG = "jpeg", "JPEG"


class VLMSettings(models.Model):
    """The one settings row. Blank/null fields mean "use the environment default"
    (see vllm_control.config.resolve_config, the only reader of these fields)."""

    mode = models.CharField(max_length=10, choices=Mode.choices, blank=True)
    model = models.CharField(max_length=200, blank=True, help_text=f"Default: {DEFAULT_MODEL}")
    served_model_name = models.CharField(max_length=200, blank=True, help_text="Default: the model id")

    # Local runner (`vllm serve`)
    host = models.CharField(max_length=100, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    protocol = models.CharField(max_length=5, blank=True, choices=[("http", "http"), ("https", "https")])
    base_url = models.CharField(max_length=300, blank=True)
    serve_args = models.TextField(blank=True)
    stop_signal = models.CharField(max_length=10, blank=True)
    stop_grace_ms = models.PositiveIntegerField(null=True, blank=True)
    start_timeout_s = models.PositiveIntegerField(default=900, validators=[MinValueValidator(1)])
    health_check_interval_s = models.PositiveIntegerField(default=10, validators=[MinValueValidator(1)])
    max_restart_attempts = models.PositiveIntegerField(default=10)
    restart_delay_s = models.PositiveIntegerField(default=10)
    gpu_memory_utilization = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.05), MaxValueValidator(1.0)]
    )
    max_model_len = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(256)])
    tensor_parallel_size = models.PositiveSmallIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    data_parallel_size = models.PositiveSmallIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    autostart = models.BooleanField(default=True)
    idle_timeout_min = models.PositiveIntegerField(
        "Idle timeout (min)", null=True, blank=True,
        help_text="Stop the local server after this many minutes without requests (frees the GPU); the next page "
        "that needs it starts it again. 0: never. Blank: VLLM_IDLE_TIMEOUT_MIN, else never.",
    )
    hf_token = models.CharField(max_length=200, blank=True)
    local_api_key = models.CharField(max_length=200, blank=True)

    # External server
    external_base_url = models.CharField(max_length=300, blank=True)
    external_api_key = models.CharField(max_length=200, blank=True)

    # OCR options
    prompt_preset = models.CharField(max_length=10, choices=PromptPreset.choices, default=PromptPreset.MARKDOWN)
    custom_prompt = models.TextField(blank=True)
    target_longest_side = models.PositiveIntegerField(
        default=1288, validators=[MinValueValidator(256), MaxValueValidator(4096)]
    )
    image_format = models.CharField(max_length=4, choices=ImageFormat.choices, default=ImageFormat.PNG)
    max_tokens = models.PositiveIntegerField(default=4096, validators=[MinValueValidator(16)])
    temperature = models.FloatField(default=0.0, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)])
    page_retries = models.PositiveSmallIntegerField(default=3, validators=[MaxValueValidator(20)])
    max_in_flight = models.PositiveSmallIntegerField(
        default=16, validators=[MinValueValidator(1), MaxValueValidator(512)]
    )
    request_timeout_s = models.PositiveIntegerField(default=300, validators=[MinValueValidator(1)])
    extra_body = models.JSONField(
        default=dict,
        blank=True,
        help_text='A JSON object sent with every page request, e.g. {"chat_template_kwargs": {"enable_thinking": '
        "false}} to turn a reasoning model's thinking off (Qwen3, GLM-4.5V), or sampling options such as "
        '{"repetition_penalty": 1.05}. It cannot replace the fields ocrsite sets itself.',
    )

    # Built-in (CPU) engines
    cpu_engine = models.CharField(
        max_length=10, choices=CPUEngine.choices, blank=True,
        help_text="What Built-in (CPU) mode and the engine name builtin use; blank: the default.",
    )
    language = models.CharField(
        max_length=100, default=DEFAULT_LANGUAGE,
        help_text="Tesseract's language codes, several joined by + (eng+deu); RapidOCR and VLMs ignore it.",
    )

    updated_at = models.DateTimeField(auto_now=True)

    SECRET_FIELDS = ("hf_token", "local_api_key", "external_api_key")
    # Chat-request fields ocrsite sets itself (the retry policy and the context fit depend on them).
    RESERVED_BODY_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "n")

    class Meta:
        verbose_name = "VLM settings"
        verbose_name_plural = "VLM settings"

    def __str__(self) -> str:
        return "VLM settings"

    def save(self, *args, **kwargs) -> None:
        self.pk = 1
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):  # the singleton is never deleted
        return 0, {}

    @classmethod
    def load(cls) -> "VLMSettings":
        settings, _ = cls.objects.get_or_create(pk=1)
        return settings


class ServerKind(models.TextChoices):
    LOCAL = "local", "Local (another vllm serve on this machine)"
    EXTERNAL = "external", "External (an OpenAI-compatible URL)"


class ModelServer(models.Model):
    """A model server besides the settings' own, which stays the first endpoint. Each page request goes to
    the healthy endpoint with the least work in flight for its capacity (vllm_control.router).

    Local: another `vllm serve` of the settings' model and options, supervised like the first, on its own
    port with its own GPUs (CUDA_VISIBLE_DEVICES). External: a URL with its own API key."""

    name = models.CharField(max_length=50, blank=True, help_text="Shown on the status; blank: its URL.")
    kind = models.CharField(max_length=10, choices=ServerKind.choices, default=ServerKind.EXTERNAL)
    base_url = models.CharField(max_length=300, blank=True, help_text="External: the server's URL, e.g. http://gpu2:8000/v1")
    api_key = models.CharField(max_length=200, blank=True, help_text="External: the server's API key (never shown again).")
    port = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(65535)], help_text="Local: its port."
    )
    cuda_visible_devices = models.CharField(
        max_length=100, blank=True, help_text="Local: the GPUs it uses (CUDA_VISIBLE_DEVICES), e.g. 1 or 2,3."
    )
    capacity = models.PositiveSmallIntegerField(
        default=16, validators=[MinValueValidator(1), MaxValueValidator(512)],
        help_text="Requests it works on at once (vLLM's --max-num-seqs, or fewer); more wait in its queue.",
    )
    enabled = models.BooleanField(default=True)

    SECRET_FIELDS = ("api_key",)

    class Meta:
        ordering = ("pk",)
        verbose_name = "model server"

    def __str__(self) -> str:
        return self.name or (f"local :{self.port}" if self.kind == ServerKind.LOCAL else redact_urls(self.base_url))

    def clean(self) -> None:
        if self.kind == ServerKind.LOCAL and not self.port:
            raise ValidationError({"port": "A Local server needs its own port."})
        if self.kind == ServerKind.EXTERNAL and not self.base_url.strip():
            raise ValidationError({"base_url": "An External server needs its URL."})
