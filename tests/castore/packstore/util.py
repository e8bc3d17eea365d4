"""Helpers of the pack store tests."""

import hashlib


def pseudo_random(n: int, seed: int = 0) -> bytes:
    """``n`` incompressible bytes, the same for the same seed."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])
