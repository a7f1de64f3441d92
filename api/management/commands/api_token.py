"""`manage.py api_token create USERNAME [--name N] [--expires-days D]` (prints the token once),
`api_token list [USERNAME]`, `api_token revoke PREFIX`."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from api import tokens
from api.forms import MAX_EXPIRY_DAYS
from api.models import ApiToken
from ocrsite.database import ensure_migrated
from scans.batch import OwnerNotFound, resolve_owner


class Command(BaseCommand):
    help = "Create, list and revoke personal API tokens."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a token and print it (once)")
        create.add_argument("username")
        create.add_argument("--name", default="cli", help="what the token is for (default: cli)")
        create.add_argument("--expires-days", type=int, help=f"days until it expires (1-{MAX_EXPIRY_DAYS}; default: never)")
        listing = sub.add_parser("list", help="list tokens (never the tokens themselves)")
        listing.add_argument("username", nargs="?")
        revoke = sub.add_parser("revoke", help="revoke a token by its prefix (the 8 characters after ocr_)")
        revoke.add_argument("prefix")

    def handle(self, *args, **opts) -> None:
        ensure_migrated(self.stderr)
        getattr(self, f"_{opts['action']}")(opts)

    def _create(self, opts: dict) -> None:
        days = opts["expires_days"]
        if days is not None and not 1 <= days <= MAX_EXPIRY_DAYS:
            raise CommandError(f"--expires-days must be between 1 and {MAX_EXPIRY_DAYS}.")
        try:
            user = resolve_owner(opts["username"])
        except OwnerNotFound as exc:
            raise CommandError(str(exc)) from None
        created = tokens.create_token(user=user, name=opts["name"], expires_in_days=days)
        expiry = f", expires {created.row.expires_at:%Y-%m-%d %H:%M} UTC" if created.row.expires_at else ""
        self.stderr.write(f"Token {created.row.name!r} for {user.get_username()}{expiry}. It is shown only this once:")
        self.stdout.write(created.token)

    def _list(self, opts: dict) -> None:
        rows = ApiToken.objects.select_related("user")
        if opts["username"]:
            rows = rows.filter(user__username=opts["username"])
        for row in rows:
            state = "revoked" if row.revoked_at else "expired" if row.is_expired else "active"
            expires = f"{row.expires_at:%Y-%m-%d}" if row.expires_at else "never"
            used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
            self.stdout.write(f"{row.prefix}\t{row.user.get_username()}\t{row.name}\t{state}\texpires {expires}\tlast used {used}")

    def _revoke(self, opts: dict) -> None:
        prefix = opts["prefix"].removeprefix(f"{tokens.SCHEME}_")[:8]
        row = ApiToken.objects.filter(prefix=prefix).first()
        if row is None:
            raise CommandError(f"There is no token with the prefix {prefix!r}.")
        if tokens.revoke_token(token=row):
            self.stdout.write(f"Revoked {row.prefix} ({row.name}) of {row.user.get_username()}.")
        else:
            self.stdout.write(f"{row.prefix} ({row.name}) was already revoked.")
