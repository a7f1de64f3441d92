from django import forms
from django.core.exceptions import ValidationError

from api import targets

MAX_EXPIRY_DAYS = 3650


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. the program that uses it.")
    expires_in_days = forms.IntegerField(
        min_value=1, max_value=MAX_EXPIRY_DAYS, required=False, label="Expires in (days)",
        help_text="Leave empty for a token that does not expire.",
    )


class WebhookForm(forms.Form):
    url = forms.URLField(
        max_length=2000, required=False, label="Webhook URL", assume_scheme="https",
        help_text="Told about every scan of yours that finishes. Leave empty to use only the callback_url of uploads.",
    )

    def clean_url(self) -> str:
        url = self.cleaned_data["url"]
        if url:
            try:
                targets.check_url(url)
            except targets.TargetRefused as exc:
                raise ValidationError(str(exc)) from None
        return url
