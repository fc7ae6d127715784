"""Owns the page's users: the users file (``[web] users_file``), roles, password hashes.

The file is JSON, written atomically (a temporary name beside it, fsync, rename) with
mode 0600: ``{"version": 1, "users": {NAME: {"role", "password", "changed_at"}}}``.
A password is kept as an scrypt hash (``hashlib.scrypt``: memory-hard, 32 MiB per
check), ``scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>``; nothing else about it is stored.
No file, or one without users: the page is read-only for everyone (``dts.web.server``
then refuses to listen beyond loopback).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..journal import Event, Stage, Status
from ..spool import isotime, write_file_durably
from ..station import Station

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
# scrypt's cost: N=2^15, r=8 is 32 MiB and about 0.1 s per check on this hardware
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
_MAXMEM = 128 * SCRYPT_N * SCRYPT_R * 2


class Role(str, Enum):
    """What a user may do; each role has everything the ones before it have."""

    VIEWER = "viewer"      # reads everything; patient identifiers masked
    OPERATOR = "operator"  # also sees patient IDs, requeues, echoes, tests rules
    ADMIN = "admin"        # also sees the configuration's details

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password: str  # the hash
    changed_at: str = ""

    @property
    def generation(self) -> str:
        """Changes with the password (and role): sessions made before are void."""
        return hashlib.sha256(f"{self.role.value}:{self.password}".encode()).hexdigest()[:16]


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=128 * int(n) * int(r) * 2, dklen=len(digest) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


# Checked when the name is unknown too, so that the time taken does not tell names apart.
@functools.cache
def dummy_hash() -> str:
    """A hash to check an unknown name's password against, so that it takes as long as a
    known one's (made at the first login, not when the module is imported: 0.1 s)."""
    return hash_password(secrets.token_hex(8))


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise UsageError(f"not a user name (letters, digits, '_.@-', at most 64): {name!r}")
    return name


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"a password needs at least {MIN_PASSWORD} characters")
    if password != password.strip() or "\n" in password:
        raise UsageError("a password must not start or end with blanks")
    return password


class UserFile:
    """The users file; re-read when it changes on disk (``dts web user`` from a shell)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def users(self) -> dict[str, User]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return {}
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._users = self._read()
            self._stamp = stamp
        return dict(self._users)

    def any(self) -> bool:
        return bool(self.users())

    def get(self, name: str) -> User | None:
        return self.users().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.get(name) if NAME.match(name or "") else None
        ok = check_password(password, user.password if user else dummy_hash())
        return user if ok and user is not None else None

    def add(self, name: str, role: Role, password: str) -> User:
        users = self._read()
        check_name(name)
        if name in users:
            raise UsageError(f"user {name} exists already (dts web user passwd {name}, or "
                             "remove it first)")
        user = User(name, role, hash_password(check_new_password(password)), isotime())
        users[name] = user
        self._write(users)
        return user

    def passwd(self, name: str, password: str, role: Role | None = None) -> User:
        users = self._read()
        old = users.get(name)
        if old is None:
            raise UsageError(f"no user {name} in {self.path}")
        user = User(name, role or old.role, hash_password(check_new_password(password)),
                    isotime())
        users[name] = user
        self._write(users)
        return user

    def remove(self, name: str) -> None:
        users = self._read()
        if users.pop(name, None) is None:
            raise UsageError(f"no user {name} in {self.path}")
        self._write(users)

    def _read(self) -> dict[str, User]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.path}: unreadable users file: {exc}") from None
        out: dict[str, User] = {}
        entries = raw.get("users") if isinstance(raw, dict) else None
        if not isinstance(entries, dict):
            raise UsageError(f"{self.path}: not a users file (no \"users\" object)")
        for name, entry in entries.items():
            try:
                out[name] = User(check_name(name), Role(entry["role"]), str(entry["password"]),
                                 str(entry.get("changed_at", "")))
            except (KeyError, TypeError, ValueError, UsageError) as exc:
                raise UsageError(f"{self.path}: user {name!r}: {exc}") from None
        return out

    def _write(self, users: dict[str, User]) -> None:
        data: dict[str, Any] = {"version": 1, "users": {
            u.name: {"role": u.role.value, "password": u.password, "changed_at": u.changed_at}
            for u in sorted(users.values(), key=lambda u: u.name)}}
        write_private(self.path, (json.dumps(data, indent=2) + "\n").encode())


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (0600), atomically: temporary name, fsync,
    rename; the folder is made (0700) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_durably(path, data, mode=0o600)


# -- dts web user add|passwd|remove: the file changed, and the change in the journal ------

def manage(station: Station, action: str, name: str, *, role: Role | None = None,
           password: str | None = None, by: str = "") -> User | None:
    """Add a user, set a password (and role), or remove one; audited as a
    ``user-changed`` event (stage web)."""
    users = UserFile(station.config.web.users_file)
    user: User | None
    if action == "add":
        assert role is not None and password is not None
        user = users.add(name, role, password)
    elif action == "passwd":
        assert password is not None
        user = users.passwd(name, password, role)
    elif action == "remove":
        users.remove(name)
        user = None
    else:
        raise UsageError(f"unknown action {action!r}")
    station.journal.emit(Stage.WEB, Event.USER_CHANGED, Status.INFO,
                         f"web user {name}: {action}" + (f" ({user.role.value})" if user else "")
                         + (f" by {by}" if by else ""),
                         user=name, action=action, role=user.role.value if user else None,
                         by=by or None)
    return user
