"""Access tokens: scoped, signed, expiring, revocable.

A token is a JWT (HS256, PyJWT) signed with the store's token key, a random
32-byte file (``token.key`` in the data directory, mode 0600, or the file
``TVIX_STORE_TOKEN_KEY_FILE`` names). Its claims: ``jti`` (the id),
``scp`` (scopes), ``caches`` (cache-name globs), ``iat`` and, optionally,
``exp``. Every token made is recorded in ``service.sqlite`` next to it, so
``token list`` shows them and ``token revoke`` ends one at once: a token
whose id is not recorded, or is revoked, is refused.

Frontends over a shared store keep the records in its PostgreSQL database
instead (:mod:`tvix_store.servicedb`), and the key too unless
``TVIX_STORE_TOKEN_KEY_FILE`` names one: every frontend then honours the
same tokens and revocations.

Enforcement starts with the first token made and never stops by itself
(revoking every token does not open the store again).
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvix_castore.errors import CastoreError, NotFound, ValidationError
from tvix_store.servicedb import Executor, service_db

__all__ = [
    "SCOPES",
    "AccessDenied",
    "Claims",
    "Forbidden",
    "TokenAuthority",
    "Unauthenticated",
]

SCOPES = ("pull", "push", "delete", "admin")
# What a scope also allows: a pusher reads what it pushes (Nix checks first), admin is all.
_IMPLIES = {
    "pull": {"pull"},
    "push": {"pull", "push"},
    "delete": {"pull", "delete"},
    "admin": set(SCOPES),
}
_ALGORITHM = "HS256"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, created REAL NOT NULL,
    expires REAL, scopes TEXT NOT NULL, caches TEXT NOT NULL, description TEXT NOT NULL,
    revoked REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS service_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
MIGRATIONS = (  # (the same tables in a shared PostgreSQL: component "tokens")
    """
    CREATE TABLE tokens (id text PRIMARY KEY, created double precision NOT NULL,
        expires double precision, scopes text NOT NULL, caches text NOT NULL,
        description text NOT NULL, revoked double precision);
    CREATE TABLE service_meta (key text PRIMARY KEY, value text NOT NULL)
    """,
)


class AccessDenied(CastoreError):
    """A request without the right to do what it asks."""


class Unauthenticated(AccessDenied):
    """No credential where one is needed, or one that is malformed, expired or revoked (401)."""


class Forbidden(AccessDenied):
    """A valid token whose scopes or caches do not cover the request (403)."""


@dataclass(frozen=True)
class Claims:
    """What a verified token allows."""

    id: str
    scopes: frozenset[str]
    caches: tuple[str, ...]
    expires: float | None

    def allows(self, scope: str, cache: str) -> bool:
        """Whether this token may ``scope`` on ``cache`` (``""``: the default cache)."""
        if not any(scope in _IMPLIES[s] for s in self.scopes):
            return False
        name = cache or "default"
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.caches)


@dataclass(frozen=True)
class TokenRecord:
    """A token as ``token list`` shows it (never the token itself)."""

    id: str
    created: float
    expires: float | None
    scopes: tuple[str, ...]
    caches: tuple[str, ...]
    description: str
    revoked: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "expires": self.expires,
            "scopes": list(self.scopes),
            "caches": list(self.caches),
            "description": self.description,
            "revoked": self.revoked,
        }


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    """``scopes`` if each is known and there is at least one."""
    if not scopes:
        raise ValidationError("a token needs at least one scope")
    for s in scopes:
        if s not in SCOPES:
            raise ValidationError(f"unknown scope {s!r} (known: {', '.join(SCOPES)})")
    return tuple(dict.fromkeys(scopes))


class TokenAuthority:
    """Makes, verifies, lists and revokes the tokens of one service directory."""

    def __init__(self, home: Path, key_file: Path | None = None, url: str | None = None) -> None:
        """``url``: a PostgreSQL database (a shared store's) holding the records and key."""
        self.home = home
        env = os.environ.get("TVIX_STORE_TOKEN_KEY_FILE")
        named = key_file or (Path(env) if env else None)
        self.key_file = named or (None if url else home / "token.key")
        self._sdb = service_db(home, url, "tokens", _SCHEMA, MIGRATIONS)
        self._key: bytes | None = None
        self._enforced = False  # (once on, never off: remembered)
        # Token text → its verified claims: the signature is checked once per token;
        # expiry and revocation are still checked on every request.
        self._verified: dict[str, dict[str, Any]] = {}

    # -- storage ------------------------------------------------------------------------
    def close(self) -> None:
        self._sdb.close()

    def _signing_key(self, create: bool) -> bytes:
        if self._key is not None:
            return self._key
        key = self._file_key(create) if self.key_file is not None else self._db_key(create)
        if len(key) < 32:
            raise ValidationError(f"token key {self.key_file} is shorter than 32 bytes")
        self._key = key
        return key

    def _file_key(self, create: bool) -> bytes:
        assert self.key_file is not None
        try:
            data = self.key_file.read_bytes()
        except FileNotFoundError:
            if not create:
                raise Unauthenticated(
                    "this store has no token key: no token can be valid"
                ) from None
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32).hex().encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            data = self.key_file.read_bytes()
        return data.strip()

    def _db_key(self, create: bool) -> bytes:
        """The key kept in the shared database (made once, by whoever comes first)."""

        def body(conn: Executor) -> bytes | None:
            if create:
                conn.execute(
                    "INSERT INTO service_meta (key, value) VALUES ('token_key', ?)"
                    " ON CONFLICT (key) DO NOTHING",
                    (secrets.token_bytes(32).hex(),),
                )
            row = conn.execute("SELECT value FROM service_meta WHERE key = 'token_key'").fetchone()
            return None if row is None else str(row[0]).encode()

        key = self._sdb.write("reading the token key", body)
        if key is None:
            raise Unauthenticated("this store has no token key: no token can be valid")
        return key

    def enforced(self) -> bool:
        """Whether tokens are required (any token was ever made for this store)."""
        if self._enforced:
            return True
        if not self._sdb.exists():
            return False
        row = self._sdb.one("SELECT value FROM service_meta WHERE key = 'auth'")
        self._enforced = row is not None
        return self._enforced

    # -- tokens -------------------------------------------------------------------------
    def create(
        self,
        scopes: Sequence[str],
        caches: Sequence[str] = ("*",),
        expires_in: float | None = None,
        description: str = "",
        now: float | None = None,
    ) -> tuple[TokenRecord, str]:
        """A new token: its record and the token text."""
        import jwt

        scopes = check_scopes(scopes)
        caches = tuple(caches) or ("*",)
        now = time.time() if now is None else now
        record = TokenRecord(
            id=secrets.token_hex(8),
            created=now,
            expires=None if expires_in is None else now + expires_in,
            scopes=scopes,
            caches=caches,
            description=description,
            revoked=None,
        )
        claims: dict[str, Any] = {
            "jti": record.id,
            "iat": int(now),
            "scp": list(scopes),
            "caches": list(caches),
        }
        if record.expires is not None:
            claims["exp"] = int(record.expires)
        text = jwt.encode(claims, self._signing_key(create=True), algorithm=_ALGORITHM)

        def insert(conn: Executor) -> None:
            conn.execute(
                "INSERT INTO tokens (id, created, expires, scopes, caches, description)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.created,
                    record.expires,
                    ",".join(scopes),
                    "\n".join(caches),
                    description,
                ),
            )
            conn.execute(
                "INSERT INTO service_meta (key, value) VALUES ('auth', '1')"
                " ON CONFLICT (key) DO NOTHING"
            )

        self._sdb.write("recording a token", insert)
        return record, text

    def list(self) -> list[TokenRecord]:
        if not self._sdb.exists():
            return []
        rows = self._sdb.rows(
            "SELECT id, created, expires, scopes, caches, description, revoked FROM tokens"
            " ORDER BY created, id"
        )
        return [
            TokenRecord(r[0], r[1], r[2], tuple(r[3].split(",")), tuple(r[4].split("\n")), *r[5:])
            for r in rows
        ]

    def revoke(self, token_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now

        def mark(conn: Executor) -> None:
            cur = conn.execute(
                "UPDATE tokens SET revoked = COALESCE(revoked, ?) WHERE id = ?", (now, token_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no token with id {token_id!r}")

        self._sdb.write("revoking a token", mark)

    def verify(self, text: str, now: float | None = None) -> Claims:
        """The claims of a valid token, else :class:`Unauthenticated` saying why."""
        claims = self._verified.get(text)
        if claims is None:
            claims = self._decode(text)
            if len(self._verified) >= 1024:
                self._verified.clear()
            self._verified[text] = claims
        token_id = claims["jti"]
        row = self._sdb.one("SELECT revoked, expires FROM tokens WHERE id = ?", (str(token_id),))
        if row is None:
            raise Unauthenticated(f"token {token_id} is not known to this store")
        if row[0] is not None:
            raise Unauthenticated(f"token {token_id} was revoked")
        expires, at = row[1], time.time() if now is None else now
        exp = claims.get("exp")
        if (expires is not None and at >= expires) or (isinstance(exp, int) and at >= exp):
            raise Unauthenticated("token expired")
        scopes = claims.get("scp")
        caches = claims.get("caches", ["*"])
        if not isinstance(scopes, list) or not all(s in SCOPES for s in scopes):
            raise Unauthenticated("invalid token: bad scopes")
        if not isinstance(caches, list) or not all(isinstance(c, str) for c in caches):
            raise Unauthenticated("invalid token: bad caches")
        return Claims(str(token_id), frozenset(scopes), tuple(caches), expires)

    def _decode(self, text: str) -> dict[str, Any]:
        import jwt

        try:
            return dict(
                jwt.decode(
                    text,
                    self._signing_key(create=False),
                    algorithms=[_ALGORITHM],
                    options={"require": ["jti", "iat"], "verify_exp": False},
                )
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None

    def authorize(self, text: str | None, scope: str, cache: str, needed: bool) -> Claims | None:
        """Check a request's token for ``scope`` on ``cache``.

        ``needed``: whether the request needs a token at all (a write once
        tokens are enforced, a read of a private cache). A token given is
        always checked, needed or not.
        """
        if text is None:
            if needed:
                raise Unauthenticated(f"this request needs a token with scope {scope!r}")
            return None
        claims = self.verify(text)
        if needed and not claims.allows(scope, cache):
            raise Forbidden(
                f"token {claims.id} does not allow {scope!r} on cache {cache or 'default'!r}"
            )
        return claims
