"""The HTTP API: routes under /v1, health checks, the page at /, every error one JSON line.

``create_app(service, keys=..., cors=...)`` builds the FastAPI application; command.py runs it under uvicorn.
Without ``keys`` every route is open (the command then serves on a loopback address only); with them, each /v1
route needs a key of its scope: read (verify, embed, identify, listings) or write (enroll, delete).
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import SiamkitError, logger
from .faces_shown import wants_faces
from .fields import read_fields
from .images import BadImage
from .keys import KeyRing
from .limits import BodyLimit
from .service import RequestError, Service
from .store import StoreUnavailable

PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error the server sends: {"error": "one line"}."""
    line = " ".join(str(message).split()) or "error"
    return JSONResponse({"error": line}, status_code=status, headers=headers)


def _body_doc(files: tuple[str, ...], values: tuple[str, ...] = (), many: bool = False) -> dict:
    """The OpenAPI description of a body read by fields.read_fields (multipart, or JSON with base64 images)."""
    def props(binary: bool) -> dict:
        image = {"type": "string", "format": "binary" if binary else "byte"}
        out = {f: ({"type": "array", "items": image} if many else image) for f in files}
        out.update({v: {"type": "string"} for v in values})
        return {"type": "object", "properties": out, "required": list(files)}

    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": props(True)},
                                                          "application/json": {"schema": props(False)}}}}


def _auth(keys: KeyRing | None, scope: str):
    """A dependency that lets a request through with a key of ``scope`` (write keys may also read)."""
    async def check(request: Request) -> None:
        if keys is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key")
        have = keys.scope_of(token)
        if have is None:
            raise RequestError("a valid API key is needed (Authorization: Bearer TOKEN, or X-API-Key: TOKEN)"
                               if not token else "this API key is not valid", 401)
        if scope == "write" and have != "write":
            raise RequestError("this API key may only read; enrolling and deleting need a write key", 403)

    return Depends(check)


def create_app(service: Service, *, keys: KeyRing | None = None, cors: list[str] | None = None,
               max_upload_mb: float = 10) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # after uvicorn has finished the requests in flight
        logger.info("serve: stopped; the store is closed")

    # No /docs or /redoc: FastAPI renders them with scripts fetched from a CDN at view time, and a siamkit server
    # serves nothing that reaches the internet (an offline machine would show a blank page). /openapi.json is the
    # description; any OpenAPI viewer reads it.
    app = FastAPI(title="siamkit serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Face (or any identity) verification and 1:N identification with a siamkit model.")
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 2**20))
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    _add_model_routes(app, service, keys)
    _add_gallery_routes(app, service, keys)
    _add_health_and_page(app, service)
    return app


def _add_model_routes(app: FastAPI, service: Service, keys: KeyRing | None) -> None:
    read = _auth(keys, "read")

    @app.post("/v1/verify", dependencies=[read], openapi_extra=_body_doc(("image1", "image2"), ("far", "return_faces")),
              summary="Do two images show the same identity? {score, decision, threshold, source}")
    async def verify(request: Request):
        f = await read_fields(request, ("image1", "image2"), ("far", "return_faces"))
        one, two = f.files("image1"), f.files("image2")
        if len(one) != 1 or len(two) != 1:
            raise RequestError("verify takes exactly one image in each of the fields image1 and image2")
        return await service.verify(one[0], two[0], f.number("far", float), wants_faces(f.values.get("return_faces")))

    @app.post("/v1/embed", dependencies=[read], openapi_extra=_body_doc(("image",), many=True),
              summary="Embeddings of one or more images")
    async def embed(request: Request):
        f = await read_fields(request, ("image",), ())
        if not f.uploads:
            raise RequestError("embed needs one or more images in the field 'image'")
        rows = await service.embed(f.uploads)
        return {"dim": int(rows.shape[1]), "score": service.verifier.score_name, "embeddings": rows.tolist()}

    @app.get("/v1/stats", dependencies=[read], summary="Forward passes by batch size (dynamic batching)")
    async def stats():
        return {"model": service.stamp.name, "align": service.align, **service.batcher.stats()}


def _add_gallery_routes(app: FastAPI, service: Service, keys: KeyRing | None) -> None:
    read, write = _auth(keys, "read"), _auth(keys, "write")

    @app.post("/v1/galleries/{gallery}/enroll", dependencies=[write],
              openapi_extra=_body_doc(("image",), ("identity",), many=True),
              summary="Enrol one or more images under an identity (one transaction)")
    async def enroll(gallery: str, request: Request):
        f = await read_fields(request, ("image",), ("identity",))
        if "identity" not in f.values:
            raise RequestError("enroll needs the field 'identity' (the person's name) beside the images")
        return await service.enroll(gallery, f.values["identity"], f.uploads)

    @app.post("/v1/galleries/{gallery}/identify", dependencies=[read],
              openapi_extra=_body_doc(("image",), ("top_k", "far"), many=True),
              summary="Top-k identities for each image; 'unknown' below the threshold")
    async def identify(gallery: str, request: Request):
        f = await read_fields(request, ("image",), ("top_k", "far"))
        return await service.identify(gallery, f.uploads, f.number("top_k", int, 5), f.number("far", float))

    @app.delete("/v1/galleries/{gallery}/images/{image_id}", dependencies=[write], summary="Delete one image")
    async def delete_image(gallery: str, image_id: int):
        return await service.delete_image(gallery, image_id)

    @app.delete("/v1/galleries/{gallery}/identities/{identity}", dependencies=[write],
                summary="Delete an identity and all its images")
    async def delete_identity(gallery: str, identity: str):
        return await service.delete_identity(gallery, identity)

    @app.get("/v1/galleries", dependencies=[read], summary="The galleries")
    async def galleries():
        return await service.galleries()

    @app.get("/v1/galleries/{gallery}/identities", dependencies=[read], summary="A gallery's identities")
    async def identities(gallery: str):
        return await service.identities(gallery)


def _add_health_and_page(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and the store answers")
    async def readyz():
        await service.galleries()  # StoreUnavailable -> 503
        return {"status": "ready", "model": service.stamp.name}

    for path, (name, media) in PAGE_FILES.items():
        app.add_api_route(path, _page_file(name, media), methods=["GET"], include_in_schema=False)


def _page_file(name: str, media: str):
    async def serve() -> Response:
        page = resources.files("siamkit.serve") / "page" / name
        if not page.is_file():
            return error(404, f"the page file {name} is not installed")
        content = page.read_bytes()
        return HTMLResponse(content) if media == "text/html" else Response(content, media_type=media)

    return serve


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return error(e.status, str(e))

    @app.exception_handler(BadImage)
    async def bad_image(request, e: BadImage):
        return error(400, str(e))

    @app.exception_handler(SiamkitError)
    async def siamkit_error(request, e: SiamkitError):
        return error(400, str(e))

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request, e: StoreUnavailable):
        return error(503, f"the gallery store is unavailable ({e}); retry shortly", {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code in (404, 405) and e.detail in ("Not Found", "Method Not Allowed"):
            return error(e.status_code, f"no {request.method} {ascii(request.url.path)[1:-1][:200]} in this API; "
                                        f"its paths are listed at /openapi.json")
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("path", "query", "body"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        logging.getLogger("siamkit").exception("siamkit serve: unexpected error on %s", request.url.path)
        return error(500, f"internal error ({type(e).__name__}); the server log has the details")
