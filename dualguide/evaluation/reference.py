"""Reference images for distribution metrics, from a folder (``--reference DIR``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_reference_images(folder: Union[str, os.PathLike]) -> List[Image.Image]:
    """Every .png / .jpg image directly in ``folder``, sorted by name, as RGB; ``ValueError`` naming ``--reference``."""
    if not Path(folder).is_dir():
        raise ValueError(f"--reference {folder} is not a folder")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"--reference {folder} holds no .png or .jpg images")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
