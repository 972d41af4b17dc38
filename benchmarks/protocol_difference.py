"""How much the paper protocol's quirks change results: ``protocol="paper"`` vs ``"corrected"``, side by side.

Unsupervised segmentation is where the segmenter's two protocols differ (the ``(max − min) + 1e-6``
normalization, and the stretch of the whole padded token grid onto the image instead of cropping the
padding). Measured on the embedded ShapesWorld model (held-out scenes, also resampled to sizes that are not
multiples of 32, where the padding matters) and on the tiny random SD3 pipeline (random images):

- the share of pixels whose segment label differs between the two protocols (segments matched one-to-one
  by the Hungarian protocol against each other first, so only real changes count);
- the number of segments each protocol finds;
- on ShapesWorld, the unsupervised mIoU (DiffSeg's Hungarian protocol against the ground truth) of each.

    python benchmarks/protocol_difference.py --scenes 64     # JSON: benchmarks/results/protocol_difference_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from seg4diff_fast import Seg4DiffSegmenter  # noqa: E402
from seg4diff_fast.evaluation.metrics import MeanIoU, match_segments_to_classes  # noqa: E402
from seg4diff_fast.shapes import CLASSES, SIZE, ShapesWorld, load_shapes_pipeline  # noqa: E402
from seg4diff_fast.testing import tiny_sd3_pipeline  # noqa: E402


def _agreement(a: np.ndarray, b: np.ndarray, na: int, nb: int) -> float:
    """Share of pixels with the same segment after matching b's segments to a's one-to-one (Hungarian)."""
    k = max(na, nb)
    matched = match_segments_to_classes(b, a, k, None, nb)
    return float((matched == a).mean())


def compare(pipe, images, gts=None, threshold: float = 0.1, **seg_kw) -> dict:
    segs = {p: Seg4DiffSegmenter(pipe, protocol=p, **seg_kw) for p in ("paper", "corrected")}
    res = {p: s.unsupervised(images, threshold=threshold) for p, s in segs.items()}
    out: dict = {"images": len(images)}
    changed, counts = [], {p: [] for p in segs}
    for rp, rc in zip(res["paper"], res["corrected"]):
        changed.append(1.0 - _agreement(rp.label_map, rc.label_map, rp.num_segments, rc.num_segments))
        counts["paper"].append(rp.num_segments)
        counts["corrected"].append(rc.num_segments)
    out["pixels_changed"] = round(float(np.mean(changed)), 4)
    out["images_with_changes"] = int(sum(c > 0 for c in changed))
    out["mean_segments"] = {p: round(float(np.mean(v)), 2) for p, v in counts.items()}
    out["segment_count_differs"] = int(sum(a != b for a, b in zip(counts["paper"], counts["corrected"])))
    if gts is not None:
        for p in segs:
            m = MeanIoU(len(CLASSES))
            for r, gt in zip(res[p], gts):
                m.update(match_segments_to_classes(r.label_map, gt, len(CLASSES), 255, r.num_segments), gt)
            out[f"mIoU_{p}"] = round(float(m.compute()["mIoU"]), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "protocol_difference_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    shapes = load_shapes_pipeline()
    scenes = [ShapesWorld(i, SIZE).sample() for i in range(args.scenes)]
    result: dict = {"command": "python benchmarks/protocol_difference.py " + " ".join(argv or sys.argv[1:]),
                    "threads": args.threads, "torch": torch.__version__, "platform": platform.platform()}
    # ShapesWorld at its own 32x32 (a multiple of 32: only the normalization differs)
    result["shapes_32"] = compare(shapes, [s.image for s in scenes], [s.global_label_map() for s in scenes])
    # resampled to 45x37 (padded to 64x64 before the stretch: the geometry differs too)
    size = (37, 45)
    imgs = [s.image.resize((size[1], size[0]), Image.NEAREST) for s in scenes]
    gts = [np.asarray(Image.fromarray(s.global_label_map().astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST))
           .astype(np.int64) for s in scenes]
    result["shapes_45x37"] = compare(shapes, imgs, gts)
    # the tiny random SD3 pipeline, random images of ragged sizes
    rng = np.random.default_rng(0)
    rand = [rng.integers(0, 256, (int(rng.integers(20, 70)), int(rng.integers(20, 70)), 3), dtype=np.uint8)
            for _ in range(args.scenes)]
    result["tiny_sd3_random"] = compare(tiny_sd3_pipeline(t5=False), rand, layer=1, resolution=32)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
