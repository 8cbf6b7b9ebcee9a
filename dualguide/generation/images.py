"""What a generation leaves on disk: PNGs written atomically with their settings, file names made from prompts
and seeds, labelled comparison grids, and the check that an output folder can take them."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, Iterator, Sequence

from .errors import UsageError

if TYPE_CHECKING:
    from PIL import Image


def probe_folder(folder: str) -> None:
    """Create and remove a uniquely named file in ``folder``; OSError when that is not possible."""
    descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".dualguide-probe-")
    os.close(descriptor)
    os.remove(probe)


def check_output_folder(out: str) -> None:
    """UsageError naming --out unless PNGs can be written in ``out`` (made later if missing). No model needed."""
    if not out:
        raise UsageError("--out: empty path; give a folder")
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out}: is a file, not a folder")
    existing = path
    while not os.path.exists(existing):  # the nearest existing folder, where the missing ones would be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out {out}: {existing} is a file, so no folder can be made below it")
    try:
        probe_folder(existing)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"--out {out}: cannot write in {existing} ({reason})") from None


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block has ended, then act: a file is never left half-written or unrenamed."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save_png(image: "Image.Image", path: str, metadata: Dict[str, object]) -> None:
    """Write ``image`` atomically with the settings in a ``parameters`` text chunk.

    The PNG goes to a uniquely named temporary file in the same folder, then is renamed over ``path``,
    so readers and concurrent runs never see a half-written file; on any failure the temporary file
    is removed and ``path`` is left as it was. A signal waits until the PNG is in place (``signals_held``).
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, default=str))
    folder, name = os.path.split(os.path.abspath(path))
    with signals_held():
        while True:  # O_EXCL: the name is ours alone; mode 0o666 so the umask applies as for any new file
            temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
            try:
                os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
        try:
            image.save(temporary, format="PNG", pnginfo=info)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


SLUG_CHARACTERS, SLUG_BYTES = 60, 120  # a file name from a prompt stays far below the 255-byte limit of file systems


def slug(text: str) -> str:
    """``text`` as a file-name part: letters and digits (any script, lower-cased) joined by single ``_``, at most
    60 characters and 120 bytes of UTF-8; ``image`` when nothing is left. No separator, dot or control character."""
    cleaned = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    part = "_".join(filter(None, cleaned.split("_")))[:SLUG_CHARACTERS]
    part = part.encode("utf-8")[:SLUG_BYTES].decode("utf-8", errors="ignore").rstrip("_")
    return part or "image"


def image_name(prompt_index: int, image_index: int, seed: int, prompt: str) -> str:
    """The file name of image ``image_index`` of prompt ``prompt_index`` in a ``generate`` run."""
    return f"{prompt_index:03d}_{image_index:02d}_s{seed}_{slug(prompt)}.png"


def grid_name(prompts: Sequence[str]) -> str:
    """The first prompt's slug; with several prompts, their count and a digest of all of them."""
    if len(prompts) == 1:
        return slug(prompts[0])
    digest = hashlib.sha1("\n".join(prompts).encode("utf-8")).hexdigest()[:8]
    return f"{slug(prompts[0])}_and_{len(prompts) - 1}_more_{digest}"


def labelled_grid(labels: Sequence[str], rows: Sequence[Sequence["Image.Image"]], scale: int = 0) -> "Image.Image":
    """Rows of images, one column per label, the labels under the last row (images upscaled to at least 128 px)."""
    from PIL import Image, ImageDraw

    width, height = rows[0][0].size
    factor = scale or max(1, 128 // min(width, height))
    cell_w, cell_h, label_h = width * factor, height * factor, 16
    grid = Image.new("RGB", (cell_w * len(labels), cell_h * len(rows) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (column * cell_w, row * cell_h))
    for column, label in enumerate(labels):
        draw.text((column * cell_w + 3, cell_h * len(rows) + 2), label, fill="black")
    return grid
