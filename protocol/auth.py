"""Mutual challenge-response for migration connections (HMAC-SHA256).

    client -> server   HELLO, client nonce (32)
    server -> client   server nonce (32), proof("server")
    client -> server   proof("client")
    server -> client   ACCEPT

proof(role) = HMAC-SHA256(key, role | client nonce | server nonce).  Each
side proves it holds the key over nonces the other chose, so neither a peer
without the key nor a replayed conversation gets through.  Nothing is
created on the destination before the client's proof checks out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

HELLO = b"FERRY-MIGRATE/1\n"
ACCEPT = b"FERRY-ACCEPT/1\n\0"
NONCE_SIZE = 32
PROOF_SIZE = 32
MIN_KEY_SIZE = 16


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def proof(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, role + client_nonce + server_nonce, hashlib.sha256).digest()


def verify(
    key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes, claimed: bytes
) -> bool:
    return hmac.compare_digest(proof(key, role, client_nonce, server_nonce), claimed)
