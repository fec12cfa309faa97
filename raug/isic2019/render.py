"""Paint synthetic dermoscopy images whose appearance depends on the diagnosis.

An image is a skin-toned field seen through a dark circular dermoscope
vignette, with one lesion in it. What a class changes, roughly in order of how
easily a CNN picks it up at 64 px:

* colour palette and contrast of the lesion (brown NV, dark multi-coloured
  MEL, pink BCC with blue-grey nests, red-pink scaly AK, tan BKL, small DF
  with a white scar, red-purple VASC, pink SCC with a keratin centre);
* size, aspect and border (regular, irregular, moth-eaten, ill-defined);
* structures: network, dots/globules, nests, vessels, lacunae, milia, scale.

Class parameters overlap on purpose (MEL/NV, BKL/AK, AK/SCC, BCC/SCC) so the
task is learnable but not trivial. Nuisances vary independently of the class:
skin tone, lighting, white balance, lesion position/rotation/scale, vignette,
hairs, blur and sensor noise.

The lesion's own look is drawn from ``lesion_rng`` in lesion coordinates, so
several images of one ``lesion_id`` show the same lesion under different
nuisances (drawn from ``view_rng``). All functions are pure given their
generators, which keeps the synthesizer deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Style:
    """Class-level appearance parameters (colours in 0-255 RGB, sizes in lesion radii)."""

    base: RGB
    base_sd: float
    second: RGB
    second_mix: tuple[float, float]
    radius: tuple[float, float]  # fraction of the image's shorter side
    aspect: tuple[float, float]
    irregularity: tuple[float, float]
    softness: tuple[float, float]
    border_freqs: tuple[int, int] = (2, 6)


STYLES: dict[str, Style] = {  # one class a line, fields in Style's order
    "NV": Style((140, 92, 60), 13, (104, 66, 44), (0.15, 0.4), (0.22, 0.32), (0.8, 1.0), (0.02, 0.06), (0.04, 0.08)),
    "MEL": Style((84, 54, 46), 14, (36, 27, 29), (0.3, 0.65), (0.27, 0.40), (0.65, 1.0), (0.08, 0.2), (0.03, 0.08)),
    "BCC": Style((204, 150, 162), 11, (168, 140, 168), (0.2, 0.45), (0.22, 0.32), (0.75, 1.0), (0.04, 0.1), (0.07, 0.12)),
    "AK": Style((212, 112, 96), 12, (186, 88, 80), (0.2, 0.45), (0.22, 0.32), (0.7, 1.0), (0.05, 0.12), (0.12, 0.2)),
    "BKL": Style((192, 150, 96), 13, (160, 118, 74), (0.2, 0.45), (0.24, 0.34), (0.75, 1.0), (0.03, 0.07), (0.02, 0.05), (8, 14)),
    "DF": Style((150, 96, 68), 11, (124, 80, 58), (0.1, 0.3), (0.15, 0.21), (0.8, 1.0), (0.02, 0.05), (0.06, 0.1)),
    "VASC": Style((156, 30, 64), 12, (104, 30, 90), (0.2, 0.6), (0.16, 0.24), (0.8, 1.0), (0.02, 0.06), (0.02, 0.05)),
    "SCC": Style((220, 134, 118), 12, (190, 100, 90), (0.2, 0.4), (0.24, 0.34), (0.7, 1.0), (0.06, 0.14), (0.08, 0.15)),
}

# How far (in lesion radii) the lesion-coordinate noise lattices extend.
_EXTENT = 1.6


@dataclass(frozen=True)
class View:
    """Where and how the lesion is seen in one image (pixel units)."""

    cx: float
    cy: float
    radius: float
    angle: float
    flip: bool


def render_image(
    cls: str, width: int, height: int, lesion_rng: np.random.Generator, view_rng: np.random.Generator
) -> Image.Image:
    """Paint one dermoscopy-like RGB image.

    Args:
        cls: class code (one of ``STYLES``).
        width: image width in pixels.
        height: image height in pixels.
        lesion_rng: generator for the lesion's intrinsic look (shared by images of a lesion).
        view_rng: generator for this image's nuisances.

    Returns:
        An RGB ``PIL.Image`` of size ``(width, height)``.
    """
    style = STYLES[cls]
    lesion = _draw_lesion(cls, style, lesion_rng)
    short = min(width, height)
    # Images of one lesion vary in apparent size by +-12 % around the lesion's own size.
    radius = lesion["radius"] * short * view_rng.uniform(0.88, 1.12)
    view = View(
        cx=width / 2 + view_rng.normal(0, 0.07) * short,
        cy=height / 2 + view_rng.normal(0, 0.07) * short,
        radius=radius,
        angle=view_rng.uniform(0, 2 * np.pi),
        flip=bool(view_rng.random() < 0.5),
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u, v = _lesion_coords(xx, yy, view)

    img = _skin(view_rng, xx, yy, width, height)
    mask = _lesion_mask(u, v, lesion)
    field = _lesion_colour(u, v, lesion)
    img = img * (1 - mask[..., None]) + field * mask[..., None]
    for colour, alpha in _structures(cls, lesion, u, v, view, width, height):
        a = (alpha * mask)[..., None]
        img = img * (1 - a) + np.asarray(colour, np.float32) / 255.0 * a
    img = _hairs(img, view_rng, width, height)
    img = _optics(img, view_rng, xx, yy, width, height)
    out = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    if view_rng.random() < 0.4:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(view_rng.uniform(0.3, 0.8))))
    return out


def _draw_lesion(cls: str, style: Style, rng: np.random.Generator) -> dict:
    """Intrinsic lesion parameters, independent of the image they appear in."""
    k_lo, k_hi = style.border_freqs
    ks = np.arange(k_lo, k_hi + 1)
    amp = rng.uniform(*style.irregularity) / np.sqrt(len(ks))
    # Mostly a common brightness shift, a little hue shift: colours stay plausible.
    base = np.clip(np.asarray(style.base) + rng.normal(0, style.base_sd * 0.35, 3)
                   + rng.normal(0, style.base_sd), 10, 245)
    second = np.clip(np.asarray(style.second) + rng.normal(0, style.base_sd * 0.3, 3)
                     + rng.normal(0, style.base_sd * 0.7), 5, 250)
    return {
        "cls": cls,
        "radius": rng.uniform(*style.radius),
        "aspect": rng.uniform(*style.aspect),
        "ks": ks,
        "amps": amp * rng.uniform(0.3, 1.7, len(ks)),
        "phases": rng.uniform(0, 2 * np.pi, len(ks)),
        "softness": rng.uniform(*style.softness),
        "base": base / 255.0,
        "second": second / 255.0,
        "second_mix": rng.uniform(*style.second_mix),
        "noise": rng.normal(0, 1, (6, 6)),
        # Radial gradient: >0 darker centre (pigment), <0 lighter centre (scar, keratin).
        "centre": rng.uniform(-0.1, 0.25),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def _lesion_coords(xx: np.ndarray, yy: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = (xx - view.cx) / view.radius, (yy - view.cy) / view.radius
    c, s = np.cos(view.angle), np.sin(view.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (-u if view.flip else u), v


def _sample(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a lattice spanning ``[-_EXTENT, _EXTENT]^2`` in lesion coordinates."""
    n = grid.shape[0]
    gx = np.clip((u / _EXTENT + 1) / 2 * (n - 1), 0, n - 1.001)
    gy = np.clip((v / _EXTENT + 1) / 2 * (n - 1), 0, n - 1.001)
    x0, y0 = gx.astype(np.int32), gy.astype(np.int32)
    fx, fy = gx - x0, gy - y0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1 + np.tanh(0.5 * x))).astype(np.float32)


def _lesion_mask(u: np.ndarray, v: np.ndarray, lesion: dict) -> np.ndarray:
    rho = np.sqrt((u / lesion["aspect"]) ** 2 + v**2)
    phi = np.arctan2(v, u)
    border = 1 + sum(a * np.cos(k * phi + p)
                     for k, a, p in zip(lesion["ks"], lesion["amps"], lesion["phases"]))
    return _sigmoid((1 - rho / border) / lesion["softness"])


def _lesion_colour(u: np.ndarray, v: np.ndarray, lesion: dict) -> np.ndarray:
    mix = _sigmoid(_sample(lesion["noise"], u, v) * 2.5) * lesion["second_mix"] * 1.6
    mix = np.clip(mix, 0, 1)[..., None]
    colour = lesion["base"] * (1 - mix) + lesion["second"] * mix
    rho = np.sqrt(u**2 + v**2)
    shade = 1 - lesion["centre"] * np.clip(1 - rho, 0, 1)
    return (colour * shade[..., None]).astype(np.float32)


def _blobs(u, v, centres, radii, edge=0.25) -> np.ndarray:
    """Soft discs at ``centres`` (lesion coordinates) with ``radii``; union as a max."""
    out = np.zeros(u.shape, np.float32)
    for (bu, bv), r in zip(centres, radii):
        d = np.sqrt((u - bu) ** 2 + (v - bv) ** 2)
        out = np.maximum(out, _sigmoid((r - d) / (edge * r)))
    return out


def _inside(rng: np.random.Generator, n: int, r_max: float, r_min: float = 0.0) -> np.ndarray:
    """``n`` uniform points of the annulus ``r_min <= r <= r_max`` (lesion coordinates)."""
    r = np.sqrt(rng.uniform(r_min**2, r_max**2, n))
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _network(u, v, rng: np.random.Generator, freq: float, width: float) -> np.ndarray:
    """Reticular lines (pigment network), warped a little so it is not a perfect grid."""
    warp = rng.normal(0, 1, (5, 5)) * 0.15
    uu, vv = u + _sample(warp, u, v), v + _sample(warp.T, u, v)
    lu = np.exp(-(np.sin(np.pi * freq * uu) / width) ** 2)
    lv = np.exp(-(np.sin(np.pi * freq * vv) / width) ** 2)
    return np.maximum(lu, lv).astype(np.float32)


def _polylines(
    lines: list[np.ndarray], widths: list[float], view: View, width: int, height: int
) -> np.ndarray:
    """Rasterise lesion-coordinate polylines (widths in lesion radii) into a 0-1 mask."""
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    c, s = np.cos(view.angle), np.sin(view.angle)
    for pts, w in zip(lines, widths):
        u = -pts[:, 0] if view.flip else pts[:, 0]
        x = view.cx + view.radius * (c * u - s * pts[:, 1])
        y = view.cy + view.radius * (s * u + c * pts[:, 1])
        draw.line(list(zip(x.tolist(), y.tolist())), fill=255,
                  width=max(1, round(w * view.radius)), joint="curve")
    return np.asarray(layer, np.float32) / 255.0


def _walk(rng: np.random.Generator, start: np.ndarray, steps: int, step: float) -> np.ndarray:
    """A short curved line: a random walk with a slowly turning heading."""
    heading = rng.uniform(0, 2 * np.pi)
    pts = [start]
    for _ in range(steps):
        heading += rng.normal(0, 0.4)
        pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(pts)


def _branches(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Arborizing vessels: random walks from the rim inwards that fork once or twice."""
    lines = []
    for _ in range(n):
        t = rng.uniform(0, 2 * np.pi)
        p = np.array([np.cos(t), np.sin(t)]) * rng.uniform(0.5, 0.85)
        heading = t + np.pi + rng.normal(0, 0.4)
        pts = [p.copy()]
        for step in range(8):
            heading += rng.normal(0, 0.35)
            p = p + 0.11 * np.array([np.cos(heading), np.sin(heading)])
            pts.append(p.copy())
            if step in (2, 5) and rng.random() < 0.7:
                side = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
                branch = [p.copy(), p + 0.2 * np.array([np.cos(side), np.sin(side)])]
                lines.append(np.array(branch))
        lines.append(np.array(pts))
    return lines


def _structures(cls, lesion, u, v, view, width, height):
    """Class-specific structures as ``(colour, alpha)`` layers, drawn inside the lesion."""
    rng = np.random.default_rng(lesion["seed"])
    rho = np.sqrt(u**2 + v**2)
    layers = []
    if cls in ("NV", "MEL", "DF"):
        net = _network(u, v, rng, freq=rng.uniform(4, 7), width=rng.uniform(0.25, 0.4))
        strength = {"NV": 0.22, "MEL": 0.35, "DF": 0.3}[cls]
        if cls == "DF":
            net = net * np.clip((rho - 0.45) / 0.3, 0, 1)  # delicate peripheral network
        dark = lesion["second"] * 255 * (0.55 if cls == "MEL" else 0.8)
        layers.append((tuple(dark), net * strength))
    if cls == "NV":
        n = int(rng.integers(0, 25))
        pts = _inside(rng, n, 0.75)
        layers.append((tuple(lesion["second"] * 230), _blobs(u, v, pts, [0.07] * n) * 0.6))
    if cls == "MEL":
        # Blue-white veil and black blotch placed off-centre: asymmetry.
        veil = _blobs(u, v, _inside(rng, 1, 0.5), [rng.uniform(0.3, 0.55)], edge=0.5)
        layers.append(((100, 108, 138), veil * rng.uniform(0.3, 0.7)))
        blotch = _blobs(u, v, _inside(rng, 1, 0.5), [rng.uniform(0.2, 0.4)], edge=0.5)
        layers.append(((30, 22, 24), blotch * rng.uniform(0.4, 0.8)))
        if rng.random() < 0.4:
            red = _blobs(u, v, _inside(rng, 1, 0.6), [rng.uniform(0.2, 0.35)], edge=0.6)
            layers.append(((176, 88, 86), red * 0.5))
        n = int(rng.integers(6, 25))
        pts = _inside(rng, n, 1.0, 0.55)
        layers.append(((28, 20, 22), _blobs(u, v, pts, rng.uniform(0.03, 0.09, n)) * 0.85))
    if cls == "BCC":
        n = int(rng.integers(2, 7))
        nests = _blobs(u, v, _inside(rng, n, 0.7), rng.uniform(0.1, 0.22, n), edge=0.35)
        layers.append(((78, 92, 128), nests * rng.uniform(0.65, 0.9)))
        lines = _branches(rng, int(rng.integers(2, 5)))
        vessels = _polylines(lines, [0.035] * len(lines), view, width, height)
        layers.append(((178, 36, 48), vessels * 0.85))
        shiny = _blobs(u, v, _inside(rng, 2, 0.6), rng.uniform(0.08, 0.15, 2), edge=0.6)
        layers.append(((242, 232, 232), shiny * 0.5))
    if cls == "AK":
        scale = _sigmoid((_sample(rng.normal(0, 1, (9, 9)), u, v) - 0.4) * 6)
        layers.append(((240, 234, 228), scale * rng.uniform(0.3, 0.55)))
        n = int(rng.integers(10, 30))
        follicles = _blobs(u, v, _inside(rng, n, 0.85), [0.05] * n)
        layers.append(((238, 222, 210), follicles * 0.7))
    if cls == "BKL":
        n = int(rng.integers(3, 14))
        milia = _blobs(u, v, _inside(rng, n, 0.8), rng.uniform(0.03, 0.06, n))
        layers.append(((232, 226, 200), milia * 0.8))
        fissures = [_walk(rng, _inside(rng, 1, 0.6)[0], 4, 0.12) for _ in range(rng.integers(1, 5))]
        mask = _polylines(fissures, [0.035] * len(fissures), view, width, height)
        layers.append(((96, 68, 50), mask * 0.6))
    if cls == "DF":
        scar = _blobs(u, v, _inside(rng, 1, 0.1), [rng.uniform(0.4, 0.6)], edge=0.4)
        layers.append(((236, 226, 220), scar * rng.uniform(0.75, 0.95)))
    if cls == "VASC":
        n = int(rng.integers(4, 12))
        lacunae = _blobs(u, v, _inside(rng, n, 0.7), rng.uniform(0.12, 0.25, n), edge=0.2)
        layers.append(((108, 16, 36), lacunae * rng.uniform(0.5, 0.85)))
    if cls == "SCC":
        keratin = _blobs(u, v, _inside(rng, 1, 0.2), [rng.uniform(0.4, 0.6)], edge=0.5)
        layers.append(((240, 224, 168), keratin * rng.uniform(0.7, 0.95)))
        n = int(rng.integers(10, 30))
        dots = _blobs(u, v, _inside(rng, n, 0.9, 0.3), [0.04] * n)
        layers.append(((168, 30, 40), dots * 0.8))
        if rng.random() < 0.3:
            crust = _blobs(u, v, _inside(rng, 1, 0.4), [rng.uniform(0.15, 0.3)], edge=0.5)
            layers.append(((118, 52, 40), crust * 0.7))
    return layers


def _skin(rng: np.random.Generator, xx, yy, width: int, height: int) -> np.ndarray:
    """Skin field: tone from light pink to tan, with smooth blotchiness."""
    t = rng.uniform(0, 0.75)
    tone = (1 - t) * np.array([238, 204, 186]) + t * np.array([182, 132, 104])
    tone = (tone + rng.normal(0, 6, 3)) / 255.0
    blotch = np.asarray(
        Image.fromarray(rng.normal(0, 1, (4, 4)).astype(np.float32), "F").resize(
            (width, height), Image.Resampling.BICUBIC
        )
    )
    img = np.broadcast_to(tone, (height, width, 3)) * (1 + 0.03 * blotch[..., None])
    return img.astype(np.float32)


def _hairs(img: np.ndarray, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    if rng.random() >= 0.3:
        return img
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    short = min(width, height)
    for _ in range(int(rng.integers(1, 6))):
        p0, p1, p2 = rng.uniform(0, 1, (3, 2)) * [width, height]
        t = np.linspace(0, 1, 12)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
        draw.line([tuple(p) for p in curve.tolist()], fill=255,
                  width=max(1, round(short * rng.uniform(0.004, 0.01))), joint="curve")
    alpha = (np.asarray(layer, np.float32) / 255.0 * 0.85)[..., None]
    colour = np.array([40, 30, 26], np.float32) / 255.0
    return img * (1 - alpha) + colour * alpha


def _optics(img: np.ndarray, rng: np.random.Generator, xx, yy, width: int, height: int):
    """Lighting gradient, white balance, dermoscope vignette and sensor noise."""
    short = min(width, height)
    beta = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - width / 2) * np.cos(beta) + (yy - height / 2) * np.sin(beta)) / short
    light = rng.uniform(0.88, 1.08) * (1 + rng.uniform(0, 0.2) * ramp)
    img = img * light[..., None] * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    if rng.random() < 0.85:
        cx = width / 2 + rng.normal(0, 0.03) * short
        cy = height / 2 + rng.normal(0, 0.03) * short
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / (short / 2)
        keep = _sigmoid((rng.uniform(0.95, 1.3) - r) / rng.uniform(0.03, 0.08))
        dark = rng.uniform(0.02, 0.1)
        img = img * (dark + (1 - dark) * keep[..., None])
    img = img + rng.normal(0, rng.uniform(0.004, 0.02), img.shape).astype(np.float32)
    return img
