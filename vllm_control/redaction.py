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


def same_server(url: str, other: str) -> bool:
    """Whether two URLs name the same server (scheme, host and port; RFC 6454's origin), which is where a
    saved credential may be sent again without being typed anew. Two blank URLs are the same server."""
    if not url.strip() or not other.strip():
        return not url.strip() and not other.strip()
    try:
        return _origin(url) == _origin(other)
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) with the scheme's default port; raises ValueError for a malformed port."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def keep_hidden_credentials(submitted: str, saved: str) -> str:
    """A URL edited in a form that showed `redact_urls(saved)`: `***` as its credentials means "keep the
    saved ones", for the same server only (the credentials are never sent to another host). Raises
    ValueError when there are none to keep, or the URL names another server."""
    parts = urlsplit(submitted)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or userinfo != HIDDEN:
        return submitted
    saved_userinfo, saved_at, _ = urlsplit(saved).netloc.rpartition("@")
    if not saved_at:
        raise ValueError(f"There are no saved credentials to keep: replace {HIDDEN} with the user name and password.")
    if not same_server(submitted, saved):
        raise ValueError(
            f"The saved credentials belong to {redact_urls(saved)}: type them again for another server "
            f"(replace {HIDDEN} with the user name and password)."
        )
    return urlunsplit(parts._replace(netloc=f"{saved_userinfo}@{host}"))


def saved_key_for(url: str, saved_url: str, saved_key: str) -> str:
    """The saved API key a form left blank, for the same server only: raises ValueError when `url` names
    another server than the one the key was saved for (the key would go to it)."""
    if saved_key and not same_server(url, saved_url):
        raise ValueError("The saved key belongs to the saved server: type it again for this URL, or tick Clear.")
    return saved_key
