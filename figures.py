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


def svg_plot(path, series, xlabel, ylabel, title="", points=False, size=(480, 320)):
    """series: {name: (xs, ys)}. Lines (or points) on shared axes, with ticks and a legend."""
    W, H, m = size[0], size[1], 48
    xs = [x for s in series.values() for x in s[0]] or [0, 1]
    ys = [y for s in series.values() for y in s[1] if math.isfinite(y)] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: m + (x - x0) / (x1 - x0) * (W - 1.5 * m)
    sy = lambda y: H - m + (y - y0) / (y1 - y0) * (1.5 * m - H)
    esc = xml.sax.saxutils.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>',
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{esc(xlabel)}</text>',
           f'<text x="12" y="{H / 2}" text-anchor="middle" transform="rotate(-90 12 {H / 2})">{esc(ylabel)}</text>',
           f'<path d="M{m} {m / 2}V{H - m}H{W - m / 2}" stroke="black" fill="none"/>']
    for i in range(5):
        xv, yv = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        xt = f"{round(xv)}" if all(float(x).is_integer() for x in xs) else f"{xv:.4g}"  # steps, images: integers
        out.append(f'<text x="{sx(xv):.1f}" y="{H - m + 14}" text-anchor="middle">{xt}</text>')
        out.append(f'<text x="{m - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for i, (name, (sxs, sys_)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = [(sx(x), sy(y)) for x, y in zip(sxs, sys_) if math.isfinite(y)]
        if points:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="1.5" fill="{c}" fill-opacity="0.5"/>' for px, py in pts]
        elif pts:
            xy = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            out.append(f'<polyline points="{xy}" stroke="{c}" fill="none"/>')
        out.append(f'<text x="{W - m / 2 - 4}" y="{m / 2 + 14 * (i + 1)}" text-anchor="end" fill="{c}">'
                   f'{esc(name)}</text>')
    with open(path, "w") as f:
        f.write("\n".join(out + ["</svg>"]))


def timecourse_png(path, images, targets, probs, steps):
    """Rows: images; columns: input, target, then P(foreground) after each listed step. Writes a PNG.

    images (n, c, H, W) in [0, 1]; targets (n, H, W); probs (n, len(steps), H, W)."""
    gray = lambda t: t.clamp(0, 1)[:, None].expand(-1, 3, -1, -1)  # (n, 3, H, W)
    rgb = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    tiles = [rgb, gray(targets.float())] + [gray(probs[:, i]) for i in range(len(steps))]
    grid = torch.stack(tiles, 1)  # (n, cols, 3, H, W)
    grid = F.pad(grid, (1, 1, 1, 1), value=0.5)
    n, cols, _, h, w = grid.shape
    grid = grid.permute(0, 3, 1, 4, 2).reshape(n * h, cols * w, 3)  # (rows*H, cols*W, 3)
    write_png(path, (grid * 255).round().to(torch.uint8).cpu())


