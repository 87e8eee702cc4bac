"""Login: scrypt password hashes (standard library only) and the check Gradio calls.

A hash reads ``scrypt$<n>$<r>$<p>$<salt b64>$<key b64>``; config holds only such
hashes, never passwords. Make one with ``python ChuanhuStyleChat.py hash-password``
(or ``python -m modules.auth``): it asks twice on a terminal, or reads one line
from a pipe, and prints only the hash.

Verification never raises on a malformed hash, and refuses cost parameters
beyond fixed caps, so that a hash edited by hand cannot make a login hang or
exhaust memory. :class:`Authenticator` spends the same work on an unknown user
as on a known one, so that user names cannot be probed by timing.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Mapping
from typing import NamedTuple

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # 16 MiB and some 50 ms per hash
SALT_BYTES, KEY_BYTES = 16, 32

# Caps on what a stored hash may ask for: at most 64 MiB (128 * r * n bytes), and at
# most 16 times the default work (n * r * p), some 1 s.
MAX_MEMORY = 64 * 1024 * 1024
MAX_WORK = 16 * N * R * P
MAX_SALT_BYTES = 64

_NUMBER = re.compile(r"[1-9][0-9]{0,9}")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class _Params(NamedTuple):
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def hash_password(password: str) -> str:
    """A new salted scrypt hash of ``password``; ValueError if it is empty."""
    if not isinstance(password, str) or not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, N, R, P)
    return "$".join([SCHEME, str(N), str(R), str(P), _b64(salt), _b64(key)])


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``; False for a malformed hash, never an exception."""
    params = _parse(hashed)
    if params is None or not isinstance(password, str) or not password:
        return False
    try:
        candidate = _scrypt(password, params.salt, params.n, params.r, params.p)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, params.key)


def is_password_hash(value: str) -> bool:
    """Whether ``value`` is a well-formed hash this module can verify (used to refuse plaintext)."""
    return _parse(value) is not None


class Authenticator:
    """Gradio's ``launch(auth=...)`` callable, from ``{user name: password hash}``."""

    def __init__(self, users: Mapping[str, str]):
        for name, hashed in users.items():
            if not is_password_hash(hashed):  # never echo the value: it may be a plaintext password
                raise ValueError(f"the password of user {name!r} is not a {SCHEME} hash")
        self._users = dict(users)
        # checked for unknown users, so that they cost the same as known ones
        self._dummy = hash_password(secrets.token_urlsafe(16))

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def __call__(self, username: str, password: str) -> bool:
        stored = self._users.get(username) if isinstance(username, str) else None
        matches = verify_password(password, stored if stored is not None else self._dummy)
        return matches and stored is not None

    def __repr__(self) -> str:  # no hashes in logs
        count = len(self._users)
        return f"<Authenticator: {count} user{'' if count == 1 else 's'}>"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=MAX_MEMORY + 1024 * 1024, dklen=KEY_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse(hashed: object) -> _Params | None:
    """The parts of a well-formed hash within the caps, else None."""
    if not isinstance(hashed, str):
        return None
    parts = hashed.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return None
    if not all(_NUMBER.fullmatch(x) for x in parts[1:4]) or not all(_B64.fullmatch(x) for x in parts[4:]):
        return None
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or 128 * r * n > MAX_MEMORY or n * r * p > MAX_WORK:
        return None
    try:
        salt, key = (base64.b64decode(x, validate=True) for x in parts[4:])
    except (binascii.Error, ValueError):
        return None
    if not SALT_BYTES <= len(salt) <= MAX_SALT_BYTES or len(key) != KEY_BYTES:
        return None
    return _Params(n, r, p, salt, key)


def _read_password() -> str | None:
    """The password typed twice on a terminal, or one line from a pipe; None (said on stderr) if unusable."""
    if sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Repeat password: ")
        except (EOFError, KeyboardInterrupt):
            print("hash-password: cancelled", file=sys.stderr)
            return None
        if password != again:
            print("hash-password: the passwords do not match", file=sys.stderr)
            return None
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        print("hash-password: the password is empty", file=sys.stderr)
        return None
    return password


def main(argv: list[str] | None = None) -> int:
    """``hash-password``: print the hash of a password read from the terminal or stdin."""
    parser = argparse.ArgumentParser(
        prog="hash-password",
        description="Print a scrypt hash of a password, for auth.users in config.yaml. "
                    "On a terminal the password is asked twice; from a pipe, one line is read "
                    "(echo secret | python ChuanhuStyleChat.py hash-password).",
    )
    parser.parse_args(argv)
    password = _read_password()
    if password is None:
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
