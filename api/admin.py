from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from api import tokens
from api.forms import WebhookForm
from api.models import ApiToken, Webhook, WebhookDelivery


class WebhookAdminForm(forms.ModelForm):
    url = WebhookForm.base_fields["url"]
    clean_url = WebhookForm.clean_url  # the allow-list, as on the API tokens page

    class Meta:
        model = Webhook
        fields = ("url",)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Listed and revoked here; created on the API tokens page or with `manage.py api_token create`
    (the token is shown once, to its owner)."""

    list_display = ("name", "user", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "user__username")
    fields = ("user", "name", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = sum(tokens.revoke_token(token=token) for token in queryset)
        self.message_user(request, f"Revoked {count} token(s).")


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    list_display = ("user", "url", "updated_at")
    search_fields = ("user__username", "url")
    fields = ("user", "url", "updated_at")  # the secret is never shown here
    readonly_fields = ("user", "updated_at")
    form = WebhookAdminForm

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("id", "event", "user", "scan", "url", "status", "attempts", "last_status_code", "next_attempt_at", "created_at")
    list_filter = ("status", "event")
    search_fields = ("url", "user__username")
    readonly_fields = [field.name for field in WebhookDelivery._meta.fields]
    actions = ["retry_now"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Attempt the selected deliveries again now")
    def retry_now(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        count = queryset.exclude(status=WebhookDelivery.Status.DELIVERED).update(
            status=WebhookDelivery.Status.PENDING, next_attempt_at=timezone.now()
        )
        self.message_user(request, f"{count} delivery(ies) will be attempted by the web server's delivery loop.")
