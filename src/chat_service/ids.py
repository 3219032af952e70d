"""Opaque identifiers that still sort by creation time (handy for cursors and indexes)."""

import secrets
import time


def new_id() -> str:
    """48 bits of milliseconds then 80 random bits, as 32 hex characters (UUIDv7-like)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
