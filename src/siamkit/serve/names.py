"""Which gallery and identity names a client may use: never a path, never a control character, bounded in length.

Names only ever become values in the store (never file names), but they also travel back in JSON, logs and the
page, where a newline, a NUL or a 10 kB name would be a nuisance or a trap.
"""
from __future__ import annotations

import re
import unicodedata

from ..errors import SiamkitError

MAX_NAME = 128
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_gallery_name(name: str) -> str:
    if not GALLERY_NAME.fullmatch(name or ""):
        raise SiamkitError(f"gallery name {_shown(name)} is not allowed; use 1 to 64 letters, digits, '_', '.' or '-', "
                           f"starting with a letter or digit")
    return name


def check_identity_name(name: str) -> str:
    """An identity: any printable text up to MAX_NAME characters, without path separators or surrounding blanks."""
    bad = None
    if not name or not name.strip():
        bad = "is empty"
    elif len(name) > MAX_NAME:
        bad = f"is longer than {MAX_NAME} characters"
    elif any(c in "/\\" for c in name) or name in (".", ".."):
        bad = "holds a path separator"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for c in name):
        bad = "holds a control or unprintable character"
    elif name != name.strip():
        bad = "starts or ends with a blank"
    if bad:
        raise SiamkitError(f"identity name {_shown(name)} {bad}; use printable text of 1 to {MAX_NAME} characters "
                           f"without '/' or '\\\\'")
    return name


def _shown(name: str) -> str:
    """The name as an error line may show it: escaped (no raw control characters), and cut short."""
    text = ascii(name)
    return text if len(text) <= 60 else text[:57] + "...'"
