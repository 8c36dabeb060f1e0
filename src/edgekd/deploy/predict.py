"""Classify images with an exported ONNX model: `python -m edgekd.deploy.predict MODEL.onnx PATH [PATH ...]`.

Preprocessing (input size, mean/std, resize rule, class names) is read from the model's metadata
only; a model without it is refused rather than guessed. Folders are searched recursively for
image files. An unreadable file prints one error line and the others are still classified; the
exit status is then 1 (2 for a bad model or no images at all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from edgekd.data.images import IMAGE_EXTENSIONS, UnreadableImage, load_image, normalize_array
from edgekd.deploy.metadata import read_metadata
from edgekd.deploy.sessions import make_runner
from edgekd.errors import UserError

# Decompression-bomb guard of this CLI, which runs where no params.yaml is: Pillow's own limit
# (the pipeline's guard is params.yaml's data.max_image_pixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def expand(paths: list[str]) -> Iterator[Path]:
    """Files as given (whatever their extension); folders recursively, image extensions only, sorted."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
        else:
            yield path  # a missing file becomes an error line for that file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX file written by the export stage")
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--bench", action="store_true", help="add per-image model latency (ms)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    try:
        meta = read_metadata(args.model)
        run = make_runner(args.model, "onnxruntime", args.threads)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = done = 0
    latencies = []
    for path in expand(args.paths):
        try:
            img = load_image(path, meta.image_size, MAX_PIXELS)  # (H, W, 3) uint8
        except UnreadableImage as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        x = normalize_array(img.transpose(2, 0, 1)[None], meta.mean, meta.std)  # (1, 3, H, W) float32
        start = time.perf_counter()
        logits = run(x)[0].astype(np.float64)  # (C,)
        latency_ms = (time.perf_counter() - start) * 1e3
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = int(probs.argmax())
        record = {"path": str(path), "class": meta.classes[top], "confidence": round(float(probs[top]), 6)}
        if args.bench:
            record["latency_ms"] = round(latency_ms, 4)
            latencies.append(latency_ms)
        print(
            json.dumps(record, ensure_ascii=False)
            if args.json
            else f"{path}\t{record['class']}\t{record['confidence']:.4f}"
            + (f"\t{record['latency_ms']:.3f} ms" if args.bench else ""),
            flush=True,
        )
        done += 1
    if args.bench and latencies:
        p50, p90 = np.percentile(latencies, [50, 90])
        print(
            f"latency: {len(latencies)} images, p50 {p50:.3f} ms, p90 {p90:.3f} ms (first calls include warm-up)",
            file=sys.stderr,
        )
    if done + failed == 0:
        print("error: no image files found in the given paths", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
