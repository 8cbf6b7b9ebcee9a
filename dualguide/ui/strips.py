"""The live branch strip of one mode: a row per branch (uncond, cond, perturbed, guided), a column per
previewed step, labelled with the step and sigma. PIL only."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

# callback tensor -> row label, in display order
BRANCHES: Tuple[Tuple[str, str], ...] = (
    ("denoised_uncond", "uncond"),
    ("denoised_cond", "cond"),
    ("denoised_tpg", "perturbed (TPG)"),
    ("denoised_pag", "perturbed (PAG)"),
    ("denoised", "guided"),
)
CELL = 112  # pixels of a cell's longer side
LABEL_WIDTH = 104
HEADER = 30
BACKGROUND = (250, 250, 250)
OFF_CELL = (215, 215, 215)
TEXT = (20, 20, 20)


def rows_for(terms: Sequence[str]) -> List[str]:
    """The callback tensors a mode with ``terms`` shows (branches never in the batch are left out)."""
    wanted = {"denoised_cond", "denoised"}
    if "cfg" in terms:
        wanted.add("denoised_uncond")
    if "tpg" in terms:
        wanted.add("denoised_tpg")
    if "pag" in terms:
        wanted.add("denoised_pag")
    return [name for name, _ in BRANCHES if name in wanted]


def preview_steps(steps: int, every: int = 0) -> List[int]:
    """The 0-based steps that get a column: every ``every`` steps (0: about six columns) and the last."""
    every = every or max(1, round(steps / 6))
    chosen = list(range(every - 1, steps, every))
    if not chosen or chosen[-1] != steps - 1:
        chosen.append(steps - 1)
    return chosen


def _font(size: int):
    """``(font, sigma symbol)``: DejaVu Sans where installed (it has a σ), else Pillow's own font."""
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size), "σ"
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size), "sigma"
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default(), "sigma"


class Strip:
    """Columns of decoded branch predictions, redrawn as one image after each new column (the page labels it
    with ``title``)."""

    def __init__(self, title: str, rows: Sequence[str]) -> None:
        self.title = title
        self.rows = list(rows)
        self.columns: List[Tuple[str, Dict[str, Optional[Image.Image]]]] = []

    def add(self, step: int, total: int, sigma: Optional[float], images: Dict[str, Optional[Image.Image]]) -> None:
        """A column for step ``step`` (0-based) of ``total``: ``images[row]`` or None where the branch was off."""
        self.columns.append(((step, total, sigma), {row: images.get(row) for row in self.rows}))

    def image(self) -> Image.Image:
        first = next((im for _, images in self.columns for im in images.values() if im is not None), None)
        width, height = first.size if first is not None else (CELL, CELL)
        scale = CELL / max(width, height)
        cell_w, cell_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new("RGB", (LABEL_WIDTH + cell_w * max(1, len(self.columns)), HEADER + cell_h * len(self.rows) + 4), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        small, symbol = _font(11)
        labels = dict(BRANCHES)
        for r, row in enumerate(self.rows):
            draw.text((4, HEADER + r * cell_h + cell_h // 2 - 6), labels[row], fill=TEXT, font=small)
        for c, ((step, total, sigma), images) in enumerate(self.columns):
            x = LABEL_WIDTH + c * cell_w
            caption = f"step {step + 1}/{total}" + ("" if sigma is None else f"\n{symbol} {sigma:.3g}")
            draw.multiline_text((x + 3, 2), caption, fill=TEXT, font=small, spacing=1)
            for r, row in enumerate(self.rows):
                y = HEADER + r * cell_h
                image = images.get(row)
                if image is None:
                    draw.rectangle((x + 1, y + 1, x + cell_w - 2, y + cell_h - 2), fill=OFF_CELL)
                    draw.text((x + 6, y + cell_h // 2 - 6), "off", fill=TEXT, font=small)
                    continue
                resample = Image.NEAREST if cell_w >= width else Image.LANCZOS
                canvas.paste(image.convert("RGB").resize((cell_w, cell_h), resample), (x, y))
        return canvas
