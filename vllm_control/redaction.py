"""Credentials inside URLs (`http://user:password@host/v1`) stay in requests and out of everything shown:
pages, live events, error messages, log lines. They are replaced by `***`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"
# scheme://userinfo@ — the userinfo runs to the authority's last "@" (a password may hold a raw "@").
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s?#]*@")


def redact_urls(text: str) -> str:
    """`text` (a URL, a message or a log line) with the credentials of every URL in it replaced by ***."""
    return _USERINFO.sub(rf"\1{HIDDEN}@", text) if "@" in text else text


def keep_hidden_credentials(submitted: str, saved: str) -> str:
    """A URL edited in a form that showed `redact_urls(saved)`: `***` as its credentials means "keep the
    saved ones". Raises ValueError when there are none to keep."""
    parts = urlsplit(submitted)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or userinfo != HIDDEN:
        return submitted
    saved_userinfo, saved_at, _ = urlsplit(saved).netloc.rpartition("@")
    if not saved_at:
        raise ValueError(f"There are no saved credentials to keep: replace {HIDDEN} with the user name and password.")
    return urlunsplit(parts._replace(netloc=f"{saved_userinfo}@{host}"))
