"""The embedded toy model: procedural shape data, SDXL-layout model builders and a shape/colour judge.

Submodules are imported on demand (``dualguide.toy.data`` needs only numpy and PIL).
"""
