"""CRC32C (Castagnoli) checksums as the TFRecord framing of event files needs them.

A native implementation from ``google_crc32c`` or ``crc32c`` is used when one is installed;
otherwise a pure-Python one driven by precomputed 256-entry tables.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["crc32c", "masked_crc32c"]

_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _byte_table() -> tuple[int, ...]:
    """Return the CRC of every single byte value."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def _slicing_tables(count: int) -> tuple[tuple[int, ...], ...]:
    """Return ``count`` tables; table ``k`` holds the CRC of each byte followed by ``k`` zeros."""
    tables = [_byte_table()]
    for _ in range(count - 1):
        previous = tables[-1]
        tables.append(tuple((crc >> 8) ^ tables[0][crc & 0xFF] for crc in previous))
    return tuple(tables)


_TABLES = _slicing_tables(8)
_WORDS = struct.Struct("<II")


def _crc32c_python(data: bytes) -> int:
    """Return the CRC32C of ``data``, eight bytes per step ("slicing-by-8")."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _TABLES  # local names: faster look-ups in the hot loop
    crc = _U32
    whole = len(data) - len(data) % 8
    for low, high in _WORDS.iter_unpack(memoryview(data)[:whole]):
        low ^= crc
        crc = (
            t7[low & 0xFF]
            ^ t6[(low >> 8) & 0xFF]
            ^ t5[(low >> 16) & 0xFF]
            ^ t4[low >> 24]
            ^ t3[high & 0xFF]
            ^ t2[(high >> 8) & 0xFF]
            ^ t1[(high >> 16) & 0xFF]
            ^ t0[high >> 24]
        )
    for byte in data[whole:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def _native() -> Callable[[bytes], int] | None:
    """Return a C implementation of CRC32C if an optional package provides one."""
    try:
        import google_crc32c
    except ImportError:
        pass
    else:
        return google_crc32c.value
    try:
        import crc32c as crc32c_package
    except ImportError:
        return None
    return crc32c_package.crc32c


crc32c: Callable[[bytes], int] = _native() or _crc32c_python
"""Return the CRC32C checksum of ``data`` as an unsigned 32-bit integer."""


def masked_crc32c(data: bytes) -> int:
    """Return the masked CRC32C of ``data`` that TFRecord files store.

    Args:
        data: The bytes to checksum.

    Returns:
        ``rotate_right(crc, 15) + 0xA282EAD8`` modulo 2**32.

    Example:
        >>> hex(crc32c(b"123456789"))  # the standard check value of CRC-32C
        '0xe3069283'
        >>> hex(masked_crc32c(b"123456789"))
        '0xc78ab0e5'
    """
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32
