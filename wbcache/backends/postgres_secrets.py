"""Passwords kept out of all the PostgreSQL backend prints: exception messages, reprs, the
CLI's output. One function, `redact`, is applied wherever a DSN, a URL or a message from libpq
(which may quote them) goes into text. Pure Python: it works without psycopg.

A password is the part after ':' in a URL's user info, or the value of `password` or
`sslpassword` in a URL's query or a libpq key/value string. The patterns err on the side of
hiding too much: a URL's user info is taken up to the last '@' before a space (a password with
a raw '/' or '?' is hidden whole, although libpq would read it otherwise), and a quoted value
that never ends hides the rest of the text. A URL with a space in it is not one libpq accepts:
callers print no URL before libpq has parsed it (see `redact_dsn_complaint`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["MASK", "redact", "redact_dsn_complaint"]

MASK = "***"

_URL_USER_INFO = re.compile(r"(?P<head>(?:\b[A-Za-z][A-Za-z0-9+.-]*:)?//)(?P<info>\S*)@")


def _name_pattern(name: str) -> str:
    """`name` as a URL query may spell it: libpq percent-decodes names, so each character
    may also be %XX (p%61ssword is password)."""
    return "".join(f"(?:{re.escape(char)}|%{ord(char.lower()):02x}|%{ord(char.upper()):02x})"
                   for char in name)


# To the next & (libpq ends a value there only: a '#' is part of it), or the line's end (a
# space in it is not an end, so more is hidden)
_URL_QUERY_PASSWORD = re.compile(
    rf"(?P<key>[?&](?:{_name_pattern('ssl')})?{_name_pattern('password')}=)[^&\n]*",
    re.IGNORECASE)
# Not after ? or &: that is the URL query's, taken above (its value ends at the next &).
_KEYWORD_PASSWORD = re.compile(
    r"(?<![?&])(?P<key>\b(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE)
_QUOTED = re.compile(r'"([^"]*)"')
_URL_PASSWORD_WITH_SPACES = re.compile(r"//[^/@]*:[^/]*@")  # what libpq refuses, but holds one


def _hide_user_info(match: re.Match[str]) -> str:
    user, colon, _password = match["info"].partition(":")
    return f"{match['head']}{user}:{MASK}@" if colon else match[0]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every password in it replaced by ***, and each of `secrets` (passwords
    known from a parsed DSN) wherever it appears."""
    text = _URL_USER_INFO.sub(_hide_user_info, text)
    text = _URL_QUERY_PASSWORD.sub(lambda match: match["key"] + MASK, text)
    text = _KEYWORD_PASSWORD.sub(lambda match: match["key"] + MASK, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def redact_dsn_complaint(complaint: str, dsn: str) -> str:
    """libpq's message about a DSN it cannot parse. It quotes the text it stumbled on, which
    may be a piece of a password it could not delimit (`password=two words` gives `missing "="
    after "words"`): when the DSN holds a password, every quoted piece but "=" is hidden."""
    holds_password = (redact(dsn) != dsn or "password" in unquote(dsn).lower()
                      or _URL_PASSWORD_WITH_SPACES.search(dsn) is not None)
    if not holds_password:
        return complaint
    shown = {"=", *_query_names(dsn)}
    hidden = _QUOTED.sub(lambda match: match[0] if match[1] in shown else f'"{MASK}"',
                         complaint)
    return redact(hidden) + " (other quoted text hidden: the DSN holds a password)"


def _query_names(dsn: str) -> set[str]:
    """The parameter names of a URL's query, when none can hold a piece of a password: the
    password is delimited in the user info (one '@', no raw '/', '?' or '#' before it) and
    the query has no password parameter. Otherwise none (a name may then be a piece of it)."""
    match = re.fullmatch(r"postgres(?:ql)?://([^/?#@\s]*)@([^?#\s]*)\?([^#\s]*)", dsn)
    if match is None or ":" not in match[1] or "@" in match[2]:
        return set()
    names = {pair.partition("=")[0] for pair in match[3].split("&")}
    if any("password" in name.lower() for name in names):
        return set()
    return {name for name in names if re.fullmatch(r"[a-z_]+", name)}
