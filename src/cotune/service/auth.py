"""Tenant tokens: ``<tenant id>.<secret>``; only ``sha256(token)`` is stored, compared in constant time.

The secret is ``secrets.token_urlsafe(32)`` (256 bits), so a plain SHA-256 is enough: there is nothing to
brute-force that a slow password hash would protect. A leaked database therefore reveals no usable token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from cotune.service.store import Store, new_id

_TOKEN = re.compile(r"^([0-9a-f]{32})\.([A-Za-z0-9_\-]{20,100})$")
# Compared against when the tenant id is unknown, so a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"cotune-no-such-tenant").hexdigest()


def hash_token(token: str) -> str:
    """The hex SHA-256 of ``token`` (what the store keeps)."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(store: Store, name: str) -> tuple[str, str]:
    """Register a tenant called ``name``; returns ``(tenant_id, token)``. The token is shown only once."""
    tenant_id = new_id()
    token = f"{tenant_id}.{secrets.token_urlsafe(32)}"
    store.add_tenant(tenant_id, name, hash_token(token))
    return tenant_id, token


#: The stored hash of a revoked tenant: no token hashes to it, so every request of that tenant is refused.
REVOKED = "revoked"


def rotate_token(store: Store, tenant_id: str) -> str:
    """A new token for the tenant; the old one stops working at once. Shown only once."""
    token = f"{tenant_id}.{secrets.token_urlsafe(32)}"
    store.set_token_hash(tenant_id, hash_token(token))
    return token


def verify_token(store: Store, token: str | None) -> str | None:
    """The tenant id ``token`` belongs to, or ``None`` (malformed, unknown tenant or wrong secret)."""
    if not token:
        return None
    m = _TOKEN.match(token)
    tenant = store.tenant(m.group(1)) if m else None
    expected = tenant["token_hash"] if tenant else _DUMMY_HASH
    ok = hmac.compare_digest(hash_token(token), expected)
    return tenant["id"] if ok and tenant else None


def check_admin(expected: str | None, given: str | None) -> bool:
    """True when no admin token is configured, or ``given`` equals it (constant time)."""
    if not expected:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
