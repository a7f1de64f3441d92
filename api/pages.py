"""The API tokens page: create (shown once), list and revoke tokens; the webhook and its deliveries."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from api import targets, tokens, webhooks
from api.forms import TokenForm, WebhookForm
from api.models import ApiToken, Webhook, WebhookDelivery

RECENT_DELIVERIES = 20


def _page(request: HttpRequest, *, token_form=None, webhook_form=None, new_token=None, new_secret=None) -> HttpResponse:
    webhook = Webhook.objects.filter(user=request.user).first()
    context = {
        "tokens": ApiToken.objects.filter(user=request.user),
        "token_form": token_form or TokenForm(),
        "new_token": new_token,
        "webhook": webhook,
        "webhook_form": webhook_form or WebhookForm(initial={"url": webhook.url if webhook else ""}),
        "new_secret": new_secret,
        "deliveries": WebhookDelivery.objects.filter(user=request.user)[:RECENT_DELIVERIES],
    }
    return render(request, "api/tokens.html", context)


@never_cache  # the answer to a POST may hold a token or secret, shown once
@login_required
def tokens_page(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _page(request)
    form = TokenForm(request.POST)
    if not form.is_valid():
        return _page(request, token_form=form)
    created = tokens.create_token(
        user=request.user, name=form.cleaned_data["name"], expires_in_days=form.cleaned_data["expires_in_days"]
    )
    return _page(request, new_token=created)


@login_required
@require_POST
def revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    if tokens.revoke_token(token=token):
        messages.info(request, f"Revoked the token {token.name}.")
    return redirect("api:tokens")


@never_cache
@login_required
@require_POST
def webhook(request: HttpRequest) -> HttpResponse:
    action = request.POST.get("action", "save")
    if action == "delete":
        webhooks.delete_webhook(user=request.user)
        messages.info(request, "Removed the webhook and its secret.")
        return redirect("api:tokens")
    if action == "rotate":
        secret = webhooks.rotate_secret(user=request.user)
        return _page(request, new_secret=secret) if secret else redirect("api:tokens")
    form = WebhookForm(request.POST)
    if not form.is_valid():
        return _page(request, webhook_form=form)
    try:
        _, secret = webhooks.save_webhook(user=request.user, url=form.cleaned_data["url"])
    except targets.TargetRefused as exc:
        form.add_error("url", str(exc))
        return _page(request, webhook_form=form)
    if secret:
        return _page(request, new_secret=secret)
    messages.info(request, "Saved the webhook.")
    return redirect("api:tokens")
