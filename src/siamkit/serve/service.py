"""What the routes ask of the server: the model (through the batcher), the store and each gallery's live index.

Decisions are `siamkit verify`'s and `siamkit identify`'s: the same pixels (Verifier.pixels, as embed sees an
image), the same scores (pair_scores; siamkit.gallery's search) and the same calibrated thresholds
(calibration.pick_threshold). Blocking work (decoding, alignment, the store) runs in threads, the model in the
batcher's one worker, so the event loop only waits.
"""
from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass

import numpy as np

from ..calibration import pick_threshold
from ..errors import SiamkitError, warn
from ..eval.verification import pair_scores
from ..gallery import model_probe
from ..verifier import require_finite
from .batching import Batcher
from .faces_shown import png_base64
from .images import decode_upload
from .index import LiveIndex
from .names import check_gallery_name, check_identity_name
from .store import ModelStamp, Store, refuse_other_model

MAX_TOP_K = 100
UNKNOWN = "unknown"


class RequestError(SiamkitError):
    """A request the server cannot serve, with its HTTP status (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    field: str  # the form or JSON field it came in
    data: bytes
    filename: str = ""


class Service:
    def __init__(self, verifier, model_name: str, store: Store, batcher: Batcher, max_pixels: int):
        self.verifier, self.store, self.batcher, self.max_pixels = verifier, store, batcher, max_pixels
        probe = np.asarray(model_probe(verifier), dtype=np.float32)
        self.stamp = ModelStamp(model_name, int(probe.shape[-1]), verifier.score_name, probe.tobytes())
        self.indexes: dict[str, LiveIndex] = {}
        self.refused: dict[str, str] = {}  # gallery -> why this model may not serve it
        self.lock = threading.Lock()
        self.align_lock = threading.Lock()  # dlib's detector and landmarker are not documented as thread-safe
        for gallery in store.galleries():  # said once at start; each request to such a gallery is refused too
            try:
                self._check_model(gallery)
            except RequestError as e:
                warn(str(e))

    @property
    def align(self) -> bool:
        return bool(getattr(self.verifier, "align", False) or getattr(self.verifier, "reads_dlib_chips", False))

    # ------------------------------------------------------------ the model

    def _pixels(self, upload: Upload) -> np.ndarray:
        image = decode_upload(upload.data, upload.field, self.max_pixels, for_align=self.align)
        try:
            if self.align:
                with self.align_lock:
                    return self.verifier.pixels(image)
            return self.verifier.pixels(image)
        except SiamkitError as e:  # e.g. no face found with --align: name the field, not "the image"
            raise RequestError(f"{upload.field}: {e}", 422) from None

    async def model_input(self, uploads: list[Upload]) -> np.ndarray:
        """uint8 [n, C, H, W]: each upload as the model sees it (decoded; aligned when the server aligns)."""
        return np.stack(await asyncio.gather(*(asyncio.to_thread(self._pixels, u) for u in uploads)))

    async def embed(self, uploads: list[Upload], pixels: np.ndarray | None = None) -> np.ndarray:
        """Embeddings [n, D] of the uploads (of their model_input ``pixels`` when given), through the batcher."""
        rows = await self.batcher.run(await self.model_input(uploads) if pixels is None else pixels)
        return require_finite(rows, [u.field for u in uploads])

    def threshold(self, far: float | None) -> tuple[float, str]:
        """(threshold, what it is): the calibrated one, or the one at false-accept rate ``far``."""
        if far is not None and not (math.isfinite(far) and 0 < far < 1):
            rates = ", ".join((self.verifier.calibration or {}).get("thresholds_at_far") or {}) or "none"
            raise RequestError(f"far {far:g} is not a false-accept rate in (0, 1); pass one of the calibrated rates: "
                               f"{rates}")
        return pick_threshold(self.verifier.calibration, None, far, self.verifier.score_name, ("threshold", "far"))

    async def verify(self, image1: Upload, image2: Upload, far: float | None = None, faces: bool = False) -> dict:
        """{score, decision, threshold, source}; ``faces``: also the two model inputs as PNGs (faces_shown.py)."""
        threshold, source = self.threshold(far)  # before any pixel: a bad far costs nothing
        pixels = await self.model_input([image1, image2])
        rows = await self.embed([image1, image2], pixels)
        score = float(pair_scores(rows[:1], rows[1:], self.verifier.score_name)[0])
        answer = {"score": score, "decision": "same" if score >= threshold else "different",
                  "threshold": threshold, "source": source}
        if faces:
            answer["faces"] = [png_base64(p) for p in pixels]
        return answer

    # ------------------------------------------------------------ galleries

    def _check_model(self, gallery: str) -> ModelStamp | None:
        stored = self.store.gallery_model(gallery)
        if stored is not None:
            try:
                refuse_other_model(gallery, stored, self.stamp)
            except SiamkitError as e:
                raise RequestError(str(e), 409) from None
        return stored

    def _index(self, gallery: str) -> LiveIndex:
        """The live index of an existing gallery this model may serve (404 / 409 otherwise)."""
        check_gallery_name(gallery)
        with self.lock:
            index = self.indexes.get(gallery)
        if index is not None:
            return index
        if self._check_model(gallery) is None:
            raise RequestError(f"there is no gallery {gallery!r}; enroll someone into it first (POST "
                               f"/v1/galleries/{gallery}/enroll), or list the galleries with GET /v1/galleries", 404)
        index = LiveIndex(self.store, gallery, self.verifier.score_name)
        with self.lock:
            return self.indexes.setdefault(gallery, index)

    async def enroll(self, gallery: str, identity: str, uploads: list[Upload]) -> dict:
        check_gallery_name(gallery)
        check_identity_name(identity)
        if not uploads:
            raise RequestError("enroll needs one or more images in the field 'image'")
        await asyncio.to_thread(self._check_model, gallery)  # before embedding anything
        rows = await self.embed(uploads)
        sources = [_source(u, i) for i, u in enumerate(uploads)]

        def write() -> list[int]:
            self.store.create_gallery(gallery, self.stamp)
            return self.store.enroll(gallery, identity, rows, sources)

        ids = await asyncio.to_thread(write)
        await asyncio.to_thread(self._index(gallery).refresh)
        return {"gallery": gallery, "identity": identity, "image_ids": ids}

    async def identify(self, gallery: str, uploads: list[Upload], k: int = 5, far: float | None = None) -> dict:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise RequestError(f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {k!r}")
        if not uploads:
            raise RequestError("identify needs one or more images in the field 'image'")
        threshold, source = self.threshold(far)
        index = await asyncio.to_thread(self._index, gallery)
        probes = await self.embed(uploads)
        found = await asyncio.to_thread(index.search, probes, k)
        results = []
        for upload, top in zip(uploads, found):
            known = bool(top) and top[0][1] >= threshold
            results.append({"field": upload.field, "identity": top[0][0] if known else UNKNOWN, "known": known,
                            "score": top[0][1] if top else None,
                            "top_k": [{"identity": name, "score": s} for name, s in top]})
        return {"gallery": gallery, "threshold": threshold, "source": source, "results": results}

    async def delete_image(self, gallery: str, image_id: int) -> dict:
        index = await asyncio.to_thread(self._index, gallery)
        if not await asyncio.to_thread(self.store.delete_image, gallery, image_id):
            raise RequestError(f"gallery {gallery!r} holds no image {image_id}", 404)
        await asyncio.to_thread(index.refresh)
        return {"gallery": gallery, "deleted_images": 1}

    async def delete_identity(self, gallery: str, identity: str) -> dict:
        check_identity_name(identity)
        index = await asyncio.to_thread(self._index, gallery)
        n = await asyncio.to_thread(self.store.delete_identity, gallery, identity)
        if not n:
            raise RequestError(f"gallery {gallery!r} holds no identity {identity!r}", 404)
        await asyncio.to_thread(index.refresh)
        return {"gallery": gallery, "identity": identity, "deleted_images": n}

    async def galleries(self) -> dict:
        names = await asyncio.to_thread(self.store.galleries)
        return {"galleries": names}

    async def identities(self, gallery: str) -> dict:
        await asyncio.to_thread(self._index, gallery)
        found = await asyncio.to_thread(self.store.identities, gallery)
        return {"gallery": gallery, "identities": [{"identity": name, "images": n} for name, n in found]}

    def close(self) -> None:
        """Finish the queued forward passes, then close the store (SIGTERM's last steps)."""
        self.batcher.close()
        self.store.close()


def _source(upload: Upload, i: int) -> str:
    """What the store records as an image's source: its printable file name, cut short (never used as a path)."""
    name = "".join(c for c in upload.filename if c.isprintable())[:128]
    return name or f"{upload.field} {i + 1}"
