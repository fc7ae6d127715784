"""Owns who is asking: signed session cookies, CSRF tokens, login throttling.

- The session is a cookie signed with the station's session key (itsdangerous,
  HMAC-SHA1 over the payload and a timestamp): the user's name, role, a generation that
  changes with the password, a CSRF token and a session id. It expires after
  ``[web] session_hours``; a logout voids its id in this process. The cookie is
  HttpOnly and SameSite=Strict, and Secure when the page is served over TLS.
- The key is ``[web] session_key_file`` (default ``<spool>/web/session.key``), made
  once with 32 random bytes and mode 0600, so sessions survive a restart of dts web.
- CSRF: every form and POST carries the session's token (a hidden ``csrf`` field or
  the ``X-CSRF-Token`` header); the login form, before there is a session, a token
  of its own pre-session cookie.
- Throttling: five failed logins within 15 minutes for one user name, or from one
  address, refuse further logins of that name / from that address until the oldest
  of them is 15 minutes old (in memory: a restart of dts web forgets them).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from .users import Role, UserFile, write_private

SESSION_COOKIE = "dts_session"
PRE_COOKIE = "dts_login"
MAX_FAILURES = 5
WINDOW = 15 * 60.0


def session_key(path: Path) -> bytes:
    """The key that signs sessions: read, or made once (0600) when absent."""
    try:
        key = path.read_bytes().strip()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32).encode()
    write_private(path, key + b"\n")
    return key


@dataclass(frozen=True)
class Session:
    user: str | None      # None: nobody logged in (read-only page without users)
    role: Role
    csrf: str
    sid: str = ""

    @property
    def anonymous(self) -> bool:
        return self.user is None


class Sessions:
    def __init__(self, key: bytes, users: UserFile, hours: float) -> None:
        self.serializer = URLSafeTimedSerializer(key, salt="dts-web-session")
        self.pre = URLSafeTimedSerializer(key, salt="dts-web-login")
        self.users = users
        self.max_age = int(hours * 3600)
        self._void: dict[str, float] = {}  # logged-out session ids -> when they expire
        self._lock = threading.Lock()

    def make(self, name: str) -> tuple[Session, str]:
        user = self.users.get(name)
        assert user is not None
        s = Session(user.name, user.role, secrets.token_urlsafe(24), secrets.token_urlsafe(12))
        cookie = self.serializer.dumps({"u": s.user, "g": user.generation, "c": s.csrf,
                                        "s": s.sid})
        return s, cookie

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie; None when absent, forged, expired, logged out, or made
        before the user's password or role changed (or the user was removed)."""
        if not cookie:
            return None
        try:
            data: Any = self.serializer.loads(cookie, max_age=self.max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        user = self.users.get(str(data.get("u")))
        if user is None or not hmac.compare_digest(str(data.get("g")), user.generation):
            return None
        sid = str(data.get("s"))
        with self._lock:
            if sid in self._void:
                return None
        return Session(user.name, user.role, str(data.get("c")), sid)

    def void(self, session: Session) -> None:
        now = time.time()
        with self._lock:
            self._void = {k: t for k, t in self._void.items() if t > now}
            self._void[session.sid] = now + self.max_age

    # the login form's token, before there is a session
    def pre_token(self, cookie: str | None = None) -> tuple[str, str]:
        """The login form's token and its cookie; a valid cookie keeps its token (two
        login pages open, or one loaded twice, both still work)."""
        if cookie:
            try:
                token = self.pre.loads(cookie, max_age=1800)
                if isinstance(token, str):
                    return token, self.pre.dumps(token)
            except BadSignature:
                pass
        token = secrets.token_urlsafe(24)
        return token, self.pre.dumps(token)

    def check_pre(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        try:
            expected = self.pre.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return hmac.compare_digest(str(expected), token)


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf, str(token))


class Throttle:
    """Failed logins per user name and per address (see the module docstring)."""

    def __init__(self, limit: int = MAX_FAILURES, window: float = WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, name: str, address: str) -> list[str]:
        return [f"user:{name}", f"addr:{address}"]

    def wait(self, name: str, address: str, now: float | None = None) -> float:
        """Seconds until a login of ``name`` from ``address`` is taken again (0: now)."""
        now = time.monotonic() if now is None else now
        longest = 0.0
        with self._lock:
            for key in self._keys(name, address):
                q = self._failures.get(key)
                if not q:
                    continue
                while q and q[0] <= now - self.window:
                    q.popleft()
                if len(q) >= self.limit:
                    longest = max(longest, q[0] + self.window - now)
        return longest

    def failed(self, name: str, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) > 100_000:  # a flood of names: forget the oldest
                self._failures.clear()
            for key in self._keys(name, address):
                self._failures.setdefault(key, deque(maxlen=self.limit * 4)).append(now)

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            for key in self._keys(name, address):
                self._failures.pop(key, None)
