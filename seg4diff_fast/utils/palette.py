"""Colour distances for palettes a person must tell apart: sRGB → CIELAB (D65) and CIEDE2000.

CIEDE2000 (Sharma, Wu & Dalal 2005) is the CIE's perceptual colour difference: ΔE00 ≈ 1 is a just-noticeable
difference, ≈ 10 is clearly different side by side, ≥ 20 tells colours apart at a glance on a small patch.
The demo's class palette (:data:`seg4diff_fast.shapes.demo_data.CLASS_COLOURS`) is checked with it.

Example:
    >>> round(float(ciede2000(srgb_to_lab((255, 0, 0)), srgb_to_lab((0, 0, 255)))), 1)
    52.9
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ciede2000", "min_pairwise_delta_e", "srgb_to_lab"]

#: D65 reference white (CIE 1931 2°), XYZ with Y = 1.
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
#: Linear sRGB → XYZ (IEC 61966-2-1).
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])


def srgb_to_lab(rgb: Sequence[int] | np.ndarray) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB colours: (..., 3) uint8-range values → float64 (..., 3) L*, a*, b*."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # undo the sRGB transfer curve
    xyz = lin @ _SRGB_TO_XYZ.T / _WHITE_D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of CIELAB colours (..., 3) (kL = kC = kH = 1), broadcast."""
    lab1, lab2 = np.asarray(lab1, dtype=np.float64), np.asarray(lab2, dtype=np.float64)
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))  # a* stretch for near-neutral colours
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dlp, dcp = l2 - l1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    dhp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)
    lbp, cbp = (l1 + l2) / 2, (c1p + c2p) / 2
    hsum = h1p + h2p
    hbp = np.where(np.abs(h1p - h2p) > 180, np.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2), hsum / 2)
    hbp = np.where(c1p * c2p == 0, hsum, hbp)
    t = (1 - 0.17 * np.cos(np.radians(hbp - 30)) + 0.24 * np.cos(np.radians(2 * hbp))
         + 0.32 * np.cos(np.radians(3 * hbp + 6)) - 0.20 * np.cos(np.radians(4 * hbp - 63)))
    sl = 1 + 0.015 * (lbp - 50) ** 2 / np.sqrt(20 + (lbp - 50) ** 2)
    sc = 1 + 0.045 * cbp
    sh = 1 + 0.015 * cbp * t
    rt = (-2 * np.sqrt(cbp**7 / (cbp**7 + 25.0**7))
          * np.sin(np.radians(60 * np.exp(-(((hbp - 275) / 25) ** 2)))))  # the blue-region rotation term
    return np.sqrt((dlp / sl) ** 2 + (dcp / sc) ** 2 + (dhp / sh) ** 2 + rt * (dcp / sc) * (dhp / sh))


def min_pairwise_delta_e(colours: Sequence[Sequence[int]]) -> tuple[float, int, int]:
    """The smallest CIEDE2000 difference between two of ``colours`` (8-bit sRGB) and the pair's indices."""
    lab = srgb_to_lab(np.asarray(colours))
    d = ciede2000(lab[:, None], lab[None, :])
    d[np.diag_indices(len(lab))] = np.inf
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return float(d[i, j]), int(min(i, j)), int(max(i, j))
