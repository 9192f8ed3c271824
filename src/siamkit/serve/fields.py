"""A request's fields, from a multipart form or a JSON object with base64 images: one reader for every route.

Each route names the fields it takes; anything else is refused in one line naming what it takes (a misspelt
field is a mistake to report, never something to ignore). Numbers come from the body or the query string.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from .service import RequestError, Upload

MAX_PARTS = 64  # files and fields in one multipart body


@dataclass
class Fields:
    uploads: list[Upload] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)

    def files(self, name: str) -> list[Upload]:
        return [u for u in self.uploads if u.field == name]

    def number(self, name: str, kind: type, default=None):
        text = self.values.get(name)
        if text is None or text == "":
            return default
        try:
            return kind(text)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be a {'whole number' if kind is int else 'number'}, got "
                               f"{str(text)[:40]!r}") from None


async def read_fields(request, files: tuple[str, ...], values: tuple[str, ...]) -> Fields:
    """The request's image ``files`` and text ``values`` (multipart/form-data, or JSON with base64 strings)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        found = await _multipart(request)
    elif kind == "application/json":
        found = await _json(request, files)
    else:
        raise RequestError(f"send multipart/form-data or application/json, not {kind or 'no content type'!r} "
                           f"(fields: {', '.join(files + values)})", 415)
    for name, value in request.query_params.items():
        if name in values:
            found.values.setdefault(name, value)
    unknown = sorted({u.field for u in found.uploads if u.field not in files}
                     | {name for name in found.values if name not in values})
    if unknown:
        raise RequestError(f"unexpected field(s) {', '.join(map(ascii, unknown))}; this endpoint takes the image "
                           f"field(s) {', '.join(files)}" + (f" and {', '.join(values)}" if values else ""))
    return found


async def _multipart(request) -> Fields:
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS)
    except Exception as e:  # starlette's MultiPartException / HTTPException on a malformed or oversized form
        raise RequestError(f"the multipart body cannot be read ({_line(e)}); send a well-formed form") from None
    found = Fields()
    for name, value in form.multi_items():
        if isinstance(value, str):
            found.values[name] = value
        else:
            found.uploads.append(Upload(name, await value.read(), value.filename or ""))
    await form.close()
    return found


async def _json(request, files: tuple[str, ...]) -> Fields:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the body is not valid JSON; send an object such as {\"image1\": BASE64, ...}") from None
    if not isinstance(body, dict):
        raise RequestError("the JSON body must be an object of fields")
    found = Fields()
    for name, value in body.items():
        if name in files:
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                found.uploads.append(Upload(name, _base64(item, name), ""))
        elif isinstance(value, bool):  # JSON true/false, as a form would send it
            found.values[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            found.values[name] = str(value)
        else:
            raise RequestError(f"field {ascii(name)} must be a string, a number or true/false")
    return found


def _base64(value, name: str) -> bytes:
    """The bytes of a base64 string (a data: URL's prefix allowed)."""
    if not isinstance(value, str):
        raise RequestError(f"field {name} must be a base64 string (or a list of them)")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"field {name} is not valid base64") from None


def _line(e: BaseException) -> str:
    text = str(getattr(e, "detail", "") or e).strip().splitlines()
    return text[0][:120] if text else type(e).__name__
