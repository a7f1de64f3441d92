"""Settings for ocrsite, driven by the environment (see the README's configuration table)."""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from ocrsite.env import env_bool, env_int, env_list, env_path, env_rate, env_str, persistent_secret_key

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", True)
DATA_DIR = env_path("OCRSITE_DATA_DIR", Path("data"), BASE_DIR)
DATA_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = persistent_secret_key(DATA_DIR)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # the API docs page's Swagger UI, served from this package (no CDN)
    "scans",
    "vllm_control",
    "api",
    "ocrsite",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "ocrsite.limits.MultipartErrorsMiddleware",  # reads upload forms before the CSRF check does
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "ocrsite.urls"
ASGI_APPLICATION = "ocrsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "ocrsite.context_processors.navigation",
            ],
        },
    },
]


def _database_config() -> dict:
    url = env_str("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'ocrsite.sqlite3'}"
    try:
        config = dj_database_url.parse(url, conn_max_age=0)
    except Exception as exc:  # dj-database-url raises several types for bad URLs
        raise ImproperlyConfigured(f"DATABASE_URL={url!r} is not a valid database URL: {exc}") from exc
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Several writers (web process, runner, workers): WAL, BEGIN IMMEDIATE and a busy timeout
        # turn "database is locked" into a short wait.
        config["OPTIONS"] = {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
        if config["NAME"] != ":memory:":
            Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    return config


DATABASES = {"default": _database_config()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def redis_channel_layer(url: str, **config) -> dict:
    # redis-py 8 reads with a 5 s socket timeout by default, which cuts channels_redis's 5 s blocking
    # pop short and crashes every idle consumer; keep the read timeout well above it.
    host = {"address": url, "socket_timeout": 30, "socket_connect_timeout": 5}
    return {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [host], **config}}


REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL)}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "scans:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "/media/"  # never served directly: files are streamed by views that check ownership

MB = 1024 * 1024
OCRSITE_MAX_UPLOAD_MB = env_int("OCRSITE_MAX_UPLOAD_MB", 200, minimum=1)
OCRSITE_MAX_UPLOAD_REQUEST_MB = env_int("OCRSITE_MAX_UPLOAD_REQUEST_MB", OCRSITE_MAX_UPLOAD_MB, minimum=1)
OCRSITE_MAX_UPLOAD_FILES = env_int("OCRSITE_MAX_UPLOAD_FILES", 100, minimum=1)
OCRSITE_MAX_PAGES = env_int("OCRSITE_MAX_PAGES", 2000, minimum=1)
# Largest image (width x height) accepted and decoded: an A3 page scanned at 1200 dpi is 14031 x 19843
# = 278 megapixels. Checked from the file's header, before any pixel is decoded (scans/imaging.py).
OCRSITE_MAX_IMAGE_PIXELS = env_int("OCRSITE_MAX_IMAGE_PIXELS", 280_000_000, minimum=1)
OCRSITE_EMBEDDED_RUNNER = env_bool("OCRSITE_EMBEDDED_RUNNER", True)
# Bearer token for /metrics (and `ocr_worker --metrics-port`); unset: loopback clients only, no proxy.
OCRSITE_METRICS_TOKEN = env_str("OCRSITE_METRICS_TOKEN")
# The largest request body by path prefix, refused before it is read (ocrsite/limits.py); the first
# match wins, any other path gets DATA_UPLOAD_MAX_MEMORY_SIZE (Django's default, 2.5 MB). An upload's
# multipart framing (boundaries, part headers, the CSRF field) gets 1 MB on top of its files.
UPLOAD_BODY_LIMIT = OCRSITE_MAX_UPLOAD_REQUEST_MB * MB + MB
OCRSITE_BODY_LIMITS = [("/scans/upload/", UPLOAD_BODY_LIMIT), ("/api/v1/scans/", UPLOAD_BODY_LIMIT)]
# Slow clients: the whole request head must arrive within the header timeout (Granian's
# header_read_timeout, at most 60 s), and a body must progress by 64 KiB within the body timeout.
OCRSITE_HEADER_TIMEOUT_MS = env_int("OCRSITE_HEADER_TIMEOUT_MS", 10_000, minimum=1, maximum=60_000)
OCRSITE_BODY_TIMEOUT_MS = env_int("OCRSITE_BODY_TIMEOUT_MS", 20_000, minimum=1)
DATA_UPLOAD_MAX_NUMBER_FILES = OCRSITE_MAX_UPLOAD_FILES
# Uploads bigger than memory allows stream to a temporary file in the data directory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * MB
FILE_UPLOAD_TEMP_DIR = str(DATA_DIR / "tmp")
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_PERMISSIONS = 0o600

# The REST API (api/): token or session authentication (with CSRF), every endpoint for users only.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "api.pagination.Pagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ocrsite API",
    "DESCRIPTION": "OCR scanned PDFs and images: upload, follow, download. See the README for examples and webhooks.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"ScanStatusEnum": "scans.models.Scan.Status", "PageStatusEnum": "scans.models.Page.Status"},
}
OCRSITE_API_UPLOAD_RATE = env_rate("OCRSITE_API_UPLOAD_RATE", "30/minute")  # per user
OCRSITE_WEBHOOK_ALLOWED_HOSTS = env_list("OCRSITE_WEBHOOK_ALLOWED_HOSTS", ["*"])  # see api/targets.py
OCRSITE_WEBHOOK_MAX_ATTEMPTS = env_int("OCRSITE_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1, maximum=50)
OCRSITE_WEBHOOK_RETRY_BASE_MS = env_int("OCRSITE_WEBHOOK_RETRY_BASE_MS", 30_000, minimum=1)
OCRSITE_WEBHOOK_TIMEOUT_MS = env_int("OCRSITE_WEBHOOK_TIMEOUT_MS", 10_000, minimum=100)

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# HTTPS, for a site behind a TLS-terminating reverse proxy (README, "Deploying"): with the variables
# documented there, `manage.py check --deploy` is clean.
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    # Only behind a proxy that sets this header on every request (overwriting the client's).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO").upper()},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},  # one line per health check otherwise
        "pikepdf": {"level": "WARNING"},  # an INFO line when its C++ logger bridge starts
    },
}
