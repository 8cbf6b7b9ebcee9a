"""Each model family's default layers, in a module that imports nothing: the family adapters, the term settings
and the front ends (before any model or torch loads) read them from here.

SDXL: TPG on ``d6-d23`` (the official TPG code), PAG on diffusers' ``"mid"``: every transformer layer of the mid block
(m0-m9 on SDXL base, m0-m1 on a two-layer mid block, as diffusers' own default resolves). SD 1.x / 2.x: TPG on
``d4-d5``, the down level at a quarter of the latent side as SDXL's ``d6-d23`` (the TPG paper names no SD 2.1
layers), PAG on the mid block ``m0`` (diffusers). SD3 / SD3.5 (MMDiT, experimental for TPG): TPG on the joint blocks
``j2-j8``, PAG on ``j1`` (diffusers' ``blocks.1``); see ``families/mmdit.py`` for why. Flux.1 / Chroma (experimental
for TPG and PAG): TPG on the double-stream blocks ``j5-j18``, PAG on ``j7-j9`` and ``s7-s9``; see ``families/flux.py``."""

from __future__ import annotations

from typing import Dict

DEFAULT_LAYERS: Dict[str, Dict[str, str]] = {
    "sdxl": {"tpg": "d6-d23", "pag": "mid"},
    "sd": {"tpg": "d4-d5", "pag": "m0"},
    "sd3": {"tpg": "j2-j8", "pag": "j1"},
    "flux": {"tpg": "j5-j18", "pag": "j7-j9,s7-s9"},
    "chroma": {"tpg": "j5-j18", "pag": "j7-j9,s7-s9"},
}
