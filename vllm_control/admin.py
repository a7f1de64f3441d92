from django.contrib import admin
from django.http import HttpRequest

from vllm_control.forms import SECTIONS, VLMSettingsForm
from vllm_control.models import ModelServer, VLMSettings
from vllm_control.server_forms import FIELDS as SERVER_FIELDS
from vllm_control.server_forms import ModelServerForm
from vllm_control.services import delete_model_server, save_model_server, save_settings


@admin.register(VLMSettings)
class VLMSettingsAdmin(admin.ModelAdmin):
    form = VLMSettingsForm
    fieldsets = [
        (title, {"fields": [*names, *(f"clear_{n}" for n in names if n in VLMSettings.SECRET_FIELDS)]})
        for title, names in SECTIONS.items()
    ]
    list_display = ("__str__", "mode", "model", "updated_at")

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        # Viewing is managing here: a read-only change page would show the values the form keeps
        # write-only, and the settings page needs the change permission too (vllm_control.permissions).
        return self.has_change_permission(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # The one row is created on first use; creating it here is changing the settings.
        return self.has_change_permission(request) and not VLMSettings.objects.exists()

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: VLMSettings, form, change: bool) -> None:
        save_settings(row=obj)  # restarts a Local server whose model changed, as the settings page does


@admin.register(ModelServer)
class ModelServerAdmin(admin.ModelAdmin):
    """The extra model servers (the settings page lists and edits them too); the API key is write-only."""

    form = ModelServerForm
    fields = [*SERVER_FIELDS, "clear_api_key"]
    list_display = ("__str__", "kind", "port", "cuda_visible_devices", "capacity", "enabled")

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return self.has_change_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: ModelServer, form, change: bool) -> None:
        save_model_server(server=obj)

    def delete_model(self, request: HttpRequest, obj: ModelServer) -> None:
        delete_model_server(server=obj)

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        for server in queryset:
            delete_model_server(server=server)
