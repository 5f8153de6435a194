"""Image grids people can read: one column per class, small images scaled up, class names on top.

`render_grid` takes images already mapped back to [0, 1] (see `SyntheticSet.display_images`) and returns a PIL image;
`SyntheticSet.save_grid` writes it as a PNG and the HTML report inlines it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

MIN_CELL = 64  # pixels: 8x8 digits are drawn 8x larger, 32x32 CIFAR 2x, 64x64 Tiny-ImageNet as they are
GAP = 2  # pixels of white between cells (after scaling)


def cell_scale(im_size: Sequence[int], scale: int | None = None) -> int:
    """Integer up-scaling so that a cell is at least MIN_CELL pixels wide (or `scale` when given)."""
    return int(scale) if scale else max(1, -(-MIN_CELL // max(1, min(im_size))))


def render_grid(images01: torch.Tensor, num_classes: int, ipc: int, per_class: int = 10,
                class_names: Sequence[str] | None = None, scale: int | None = None):
    """A PIL image: column c holds the first `per_class` images of class c, headed by its name."""
    from PIL import Image, ImageDraw

    x = images01.detach().float().cpu().clamp(0, 1)
    c, h, w = x.shape[1:]
    s = cell_scale((h, w), scale)
    rows = max(1, min(ipc, per_class))
    ch, cw = h * s, w * s
    names = [str(n) for n in class_names] if class_names and len(class_names) == num_classes \
        else [str(i) for i in range(num_classes)]
    font = _font()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    widths = [probe.textbbox((0, 0), n, font=font)[2] for n in names]
    text_h = max(probe.textbbox((0, 0), n, font=font)[3] for n in names) + 4
    vertical = max(widths) > cw  # names wider than a column are written upwards
    header = (max(widths) + 12) if vertical else text_h
    width, height = num_classes * (cw + GAP) + GAP, header + rows * (ch + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for cls in range(num_classes):
        left = GAP + cls * (cw + GAP)
        if vertical:
            label = Image.new("RGB", (widths[cls] + 8, text_h), "white")
            ImageDraw.Draw(label).text((4, 1), names[cls], fill="black", font=font)
            label = label.rotate(90, expand=True)
            canvas.paste(label, (left + (cw - label.width) // 2, header - label.height - 2))
        else:
            draw.text((left + (cw - widths[cls]) // 2, 1), names[cls], fill="black", font=font)
        for j in range(rows):
            tile = arr[cls * ipc + j]
            tile = Image.fromarray(tile[..., 0], "L").convert("RGB") if c == 1 else Image.fromarray(tile, "RGB")
            canvas.paste(tile.resize((cw, ch), Image.NEAREST), (left, header + GAP + j * (ch + GAP)))
    return canvas


def _font():
    """Pillow's built-in font at a readable size (the scalable one where Pillow has FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font only
        return ImageFont.load_default()
