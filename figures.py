"""Figures with torch and the standard library only: SVG line plots and PNG image grids (zlib).

    figures.svg_plot("curve.svg", {"C-RBP": (steps, f1)}, "step t", "F1")
    figures.write_png("sheet.png", figures.grid(images, cols=4))      # images (n, 3, h, w) in [0, 1]

Nothing here imports the rest of the project, so every module may draw (data.py's sample sheets too).
"""
import math
import struct
import xml.sax.saxutils
import zlib

import torch
import torch.nn.functional as F


def write_png(path, rgb):
    """Write an (H, W, 3) uint8 tensor as an 8-bit RGB PNG, with zlib and struct only."""
    rgb = torch.as_tensor(rgb)
    if not (rgb.dim() == 3 and rgb.shape[2] == 3 and rgb.dtype == torch.uint8):
        raise ValueError(f"pass rgb as an (H, W, 3) uint8 tensor, got {tuple(rgb.shape)} {rgb.dtype}")
    h, w, _ = rgb.shape
    raw = torch.cat((torch.zeros(h, 1, dtype=torch.uint8), rgb.cpu().reshape(h, 3 * w)), 1)  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw.flatten().tolist()), 6))
           + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def grid(rgb, cols, zoom=1, gap=3):
    """(n, 3, h, w) float images in [0, 1] -> one (H, W, 3) uint8 sheet, zoomed by pixel repetition, grey gaps."""
    rgb = rgb.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    n, _, h, w = rgb.shape
    rows = -(-n // cols)
    sheet = torch.full((3, rows * (h + gap) + gap, cols * (w + gap) + gap), 0.5)
    for i in range(n):
        y, x = gap + (i // cols) * (h + gap), gap + (i % cols) * (w + gap)
        sheet[:, y:y + h, x:x + w] = rgb[i]
    return (sheet.clamp(0, 1) * 255).round().byte().permute(1, 2, 0)


def ticks(lo, hi, n=5, integer=False):
    """About n round tick values (1, 2 or 5 times a power of 10; whole numbers if integer) covering
    [lo, hi]: (first, last, step)."""
    if hi <= lo:  # one value: a unit-wide axis around it
        lo, hi = lo - (abs(lo) or 1) / 2, hi + (abs(hi) or 1) / 2
    e = math.floor(math.log10((hi - lo) / max(1, n - 1)))
    steps = [m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 2, 5) if not integer or m * 10.0 ** k >= 1]
    count = lambda s: math.ceil(hi / s - 1e-9) - math.floor(lo / s + 1e-9)
    step = min(steps, key=lambda s: (abs(count(s) - (n - 1)), -s))
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def tick_label(v, step):
    """Short tick text: 20k for 20,000 images, 0.25 for a metric; no float noise (0.30000000000000004)."""
    if abs(v) >= 1000 and step >= 1000:
        return f"{v / 1000:g}k" if abs(v) < 1e6 else f"{v / 1e6:g}M"
    digits = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.2g}"


def svg_plot(path, series, xlabel, ylabel, title="", points=False, size=(480, 320), colors=None, dashed=()):
    """series: {name: (xs, ys)}. Lines on shared axes with round ticks, and a legend; points=True draws every
    series as points, a set of names only those (as dots); colors: {name: index}, so that series share one;
    dashed: names drawn as dotted lines.

    The left margin grows with the longest y tick label, so no tick text is cut off; non-finite values
    are skipped."""
    W, H = size
    xs = [x for s in series.values() for x in s[0]] or [0, 1]
    ys = [y for s in series.values() for y in s[1] if math.isfinite(y)] or [0, 1]
    integer = all(float(x).is_integer() for x in xs)  # steps and images: whole-number ticks
    (x0, x1, dx), (y0, y1, dy) = ticks(min(xs), max(xs), integer=integer), ticks(min(ys), max(ys))
    xt = [x0 + i * dx for i in range(round((x1 - x0) / dx) + 1)]
    yt = [y0 + i * dy for i in range(round((y1 - y0) / dy) + 1)]
    ylabels = [tick_label(v, dy) for v in yt]
    left, right, top, bottom = 30 + 6.5 * max(map(len, ylabels)), 20, 28, 40  # 6.5 px per character at 11 px
    sx = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    sy = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    esc = xml.sax.saxutils.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>',
           f'<text x="{(left + W - right) / 2}" y="{H - 6}" text-anchor="middle">{esc(xlabel)}</text>',
           f'<text x="12" y="{H / 2}" text-anchor="middle" transform="rotate(-90 12 {H / 2})">{esc(ylabel)}</text>']
    for v in xt:
        out.append(f'<path d="M{sx(v):.1f} {H - bottom}v4" stroke="black"/>')
        out.append(f'<text x="{sx(v):.1f}" y="{H - bottom + 15}" text-anchor="middle">{tick_label(v, dx)}</text>')
    for v, label in zip(yt, ylabels):
        out.append(f'<path d="M{left - 4} {sy(v):.1f}h4" stroke="black"/>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<path d="M{left} {top}V{H - bottom}H{W - right}" stroke="black" fill="none"/>')
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for i, (name, (sxs, sys_)) in enumerate(series.items()):
        c = palette[(colors or {}).get(name, i) % len(palette)]
        pts = [(sx(x), sy(y)) for x, y in zip(sxs, sys_) if math.isfinite(y)]
        if points is True:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="1.5" fill="{c}" fill-opacity="0.5"/>' for px, py in pts]
        elif points and name in points:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{c}"/>' for px, py in pts]
        elif pts:
            xy = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            dash = ' stroke-dasharray="2 3"' if name in dashed else ""
            out.append(f'<polyline points="{xy}" stroke="{c}" fill="none"{dash}/>')
        y = top + 14 * (i + 1)  # the legend, top right
        out.append(f'<text x="{W - right - 4}" y="{y}" text-anchor="end" fill="{c}">{esc(name)}</text>')
    with open(path, "w") as f:
        f.write("\n".join(out + ["</svg>"]))


# A 3 x 5 pixel font for the column labels of timecourse_png: each glyph is 5 rows of 3 bits.
FONT = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
        "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
        "8": "111101111101111", "9": "111101111001111", "=": "000111000111000", " ": "000000000000000",
        "A": "010101111101101", "E": "111100110100111", "G": "011100101101011", "I": "111010010010111",
        "N": "101111111101101", "P": "110101110100100", "R": "110101110101101", "T": "111010010010010",
        "U": "101101101101111"}


def text_bitmap(text, scale=1):
    """(5 scale, 4 len(text) scale) bool tensor of text in FONT (upper case, digits, '=' and space)."""
    glyphs = [torch.tensor([int(b) for b in FONT[ch]], dtype=torch.bool).view(5, 3) for ch in text.upper()]
    bitmap = torch.cat([F.pad(g, (0, 1)) for g in glyphs], 1) if glyphs else torch.zeros(5, 0, dtype=torch.bool)
    return bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def timecourse_png(path, images, targets, probs, steps):
    """Rows: images; columns: input, target, then P(foreground) after each listed step, under a header row
    that names each column (INPUT, TARGET, T=1, ...). Writes a PNG.

    images (n, c, H, W) in [0, 1]; targets (n, H, W); probs (n, len(steps), H, W)."""
    gray = lambda t: t.clamp(0, 1)[:, None].expand(-1, 3, -1, -1)  # (n, 3, H, W)
    rgb = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    tiles = [rgb, gray(targets.float())] + [gray(probs[:, i]) for i in range(len(steps))]
    grid = torch.stack(tiles, 1)  # (n, cols, 3, H, W)
    grid = F.pad(grid, (1, 1, 1, 1), value=0.5)
    n, cols, _, h, w = grid.shape
    grid = grid.permute(0, 3, 1, 4, 2).reshape(n * h, cols * w, 3)  # (rows*H, cols*W, 3)
    labels = ["input", "target"] + [f"t={t}" for t in steps]
    scale = max(1, min(3, w // 30))  # 3 x 5 glyphs, larger on larger tiles
    header = torch.ones(7 * scale, cols * w, 3)  # white, 1 px of margin above and below the text
    for c, label in enumerate(labels):
        bits = text_bitmap(label, scale)[:, :w - 1]  # (5 scale, <= w - 1): cut rather than overflow
        x = c * w + (w - bits.shape[1]) // 2
        header[scale:6 * scale, x:x + bits.shape[1]][bits] = 0.0
    write_png(path, (torch.cat([header, grid]) * 255).round().to(torch.uint8).cpu())
