"""Layer ids ("d6", "m0", "u3", "j4", ranges "d6-d23") <-> a backbone's transformer blocks.

UNets: the diffusers ``BasicTransformerBlock`` modules in ``unet.named_modules()``
order, grouped by the first component of their name (``down_blocks`` -> d,
``mid_block`` -> m, ``up_blocks`` -> u) and numbered within each group, as the
official TPG code does. MMDiT transformers (SD3): j0-jN, the joint blocks in order; Flux / Chroma:
j0-jN over the double-stream blocks and s0-sM over the single-stream blocks (the family adapter lists them); a
backbone of one stack of blocks (Wan): b0-bN.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple, Union

from torch import nn

GROUP_PREFIX = {"down_blocks": "d", "mid_block": "m", "up_blocks": "u"}
LayerSpec = Union[str, Sequence[str]]
_ID = re.compile(r"^([dmujsb])(\d+)(?:-(?:\1)?(\d+))?$")
PREFIX_ORDER = "dmujsb"


def transformer_blocks(unet: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """Map every layer id of ``unet`` (or of the UNet a ``torch.compile`` wrapper holds) to ``(module name, BasicTransformerBlock)``."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.utils.torch_utils import unwrap_module

    unet = unwrap_module(unet)
    blocks: Dict[str, Tuple[str, nn.Module]] = {}
    counts = {prefix: 0 for prefix in GROUP_PREFIX.values()}
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        prefix = GROUP_PREFIX.get(name.split(".", 1)[0])
        if prefix is None:
            continue
        blocks[f"{prefix}{counts[prefix]}"] = (name, module)
        counts[prefix] += 1
    return blocks


def valid_ranges(blocks: Iterable[str]) -> str:
    """Describe the ids present as ranges, e.g. ``"d0-d23, m0-m9, u0-u35"``."""
    counts: Dict[str, int] = {}
    for layer_id in blocks:
        counts[layer_id[0]] = counts.get(layer_id[0], 0) + 1
    return ", ".join(f"{p}0-{p}{counts[p] - 1}" if counts[p] > 1 else f"{p}0" for p in PREFIX_ORDER if p in counts)


def parse_layer_ids(spec: LayerSpec, parameter: str = "layers") -> List[str]:
    """Expand ``"d6-d23"``, ``"m0"``, ``"d1,u0-u3"`` or a list of such into single ids, in order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    ids: List[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{parameter} must hold strings like 'd6', 'm0-m9', got {item!r}")
        for part in filter(None, (p.strip() for p in item.split(","))):
            match = _ID.match(part)
            if match is None:
                raise ValueError(
                    f"{parameter}: malformed layer id {part!r}; use 'd<i>', 'm<i>', 'u<i>', 'j<i>', 's<i>', 'b<i>' or a range such as 'd6-d23'"
                )
            prefix, first, last = match.group(1), int(match.group(2)), match.group(3)
            last = first if last is None else int(last)
            if last < first:
                raise ValueError(f"{parameter}: empty range {part!r}; write the lower index first")
            ids.extend(f"{prefix}{i}" for i in range(first, last + 1))
    return list(dict.fromkeys(ids))


def resolve_ids(blocks: Dict[str, Tuple[str, nn.Module]], spec: LayerSpec, parameter: str = "layers") -> List[Tuple[str, nn.Module]]:
    """Resolve a layer spec against ``blocks`` (layer id -> ``(module name, block)``) of one model.

    Raises ``ValueError`` naming ``parameter`` and the valid ranges for an id the model lacks
    or for an empty selection. ``NAMED_LAYERS_PARAMETERS`` also take diffusers' PAG layer names (``ids_of_names``).
    """
    if parameter in NAMED_LAYERS_PARAMETERS:
        spec = ids_of_names(blocks, spec, parameter)
    ids = parse_layer_ids(spec, parameter)
    if not ids:
        raise ValueError(f"{parameter} selects no layer; valid ranges for this model: {valid_ranges(blocks)}")
    unknown = [i for i in ids if i not in blocks]
    if unknown:
        raise ValueError(
            f"{parameter}: unknown layer id(s) {', '.join(unknown)}; valid ranges for this model: {valid_ranges(blocks)}"
        )
    return [blocks[i] for i in ids]


def resolve_layers(unet: nn.Module, spec: LayerSpec, parameter: str = "layers") -> List[Tuple[str, nn.Module]]:
    """Resolve a layer spec to ``(module name, BasicTransformerBlock)`` pairs of ``unet`` (see ``resolve_ids``)."""
    return resolve_ids(transformer_blocks(unet), spec, parameter)


# --------------------------------------------------------------------------------------------
# diffusers' PAG layer names ("mid", "down_blocks.1", "mid_block.attentions.0", ...) for pag_applied_layers_index
# --------------------------------------------------------------------------------------------

NAMED_LAYERS_PARAMETER = "pag_applied_layers_index"  # the call's parameter that also takes diffusers' PAG layer names
# ... and diffusers' own name for the pipelines' default of it (construction, ``set_pag_applied_layers``)
NAMED_LAYERS_PARAMETERS = (NAMED_LAYERS_PARAMETER, "pag_applied_layers")
NAME_FORMS = (
    "diffusers' PAG layer names, patterns searched in the self-attentions' module names "
    "('mid', 'down', 'up', 'down_blocks.1', 'mid_block.attentions.0', ...)"
)


def is_layer_id(item: str) -> bool:
    """Whether ``item`` is one or more comma-separated layer ids / ranges (an empty item counts as ids)."""
    return all(_ID.match(part) for part in filter(None, (p.strip() for p in item.split(","))))


def check_layer_name(name: str, parameter: str) -> str:
    """``name`` when it is a regular expression, as diffusers reads a PAG layer name; ``ValueError`` otherwise."""
    try:
        re.compile(name)
    except re.error as error:
        raise ValueError(f"{parameter}: {name!r} is neither a layer id nor a valid PAG layer name ({error}); give {NAME_FORMS}") from None
    return name


def parse_layer_spec(spec: LayerSpec, parameter: str = "layers") -> List[str]:
    """``parse_layer_ids``; for ``NAMED_LAYERS_PARAMETERS`` an item that is not ids is a diffusers PAG layer name,
    kept as it is (ids first, as ``"m0"`` is no module name). Order kept, repeats dropped."""
    if parameter not in NAMED_LAYERS_PARAMETERS:
        return parse_layer_ids(spec, parameter)
    parsed: List[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        is_ids = not isinstance(item, str) or is_layer_id(item)  # parse_layer_ids refuses what is no string
        parsed.extend(parse_layer_ids([item], parameter) if is_ids else [check_layer_name(item, parameter)])
    return list(dict.fromkeys(parsed))


def name_selects(name: str, module_name: str) -> bool:
    """diffusers' PAGMixin rule: the pattern ``name`` is found in ``module_name``, unless both end in the same
    number (diffusers' "fake integral match")."""
    name_end, module_end = name.rsplit(".", 1)[-1], module_name.rsplit(".", 1)[-1]
    if name_end.isnumeric() and name_end == module_end:
        return False
    return re.search(name, module_name) is not None


def self_attentions(block: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``block``'s self-attentions (diffusers ``Attention`` modules that are not cross-attention) by their name in it:
    what diffusers' PAG layer names are matched against (``attn1`` in a UNet's transformer blocks)."""
    return [(name, m) for name, m in block.named_modules() if name and getattr(m, "is_cross_attention", None) is False]


def ids_named(attention_names: Dict[str, List[str]], name: str, parameter: str) -> List[str]:
    """The ids whose self-attention names ``name`` selects; ``ValueError`` naming ``parameter`` and the valid forms when none."""
    ids = [i for i, names in attention_names.items() if any(name_selects(name, n) for n in names)]
    if not ids:
        raise ValueError(
            f"{parameter}: no transformer block of this model has a self-attention matching {name!r}; give layer ids "
            f"({valid_ranges(attention_names)}) or {NAME_FORMS}"
        )
    return ids


def ids_of_names(blocks: Dict[str, Tuple[str, nn.Module]], spec: LayerSpec, parameter: str) -> List[str]:
    """``spec``'s ids, each diffusers PAG layer name replaced by the ids of the blocks whose self-attention it
    selects (as diffusers' ``PAGMixin`` would select that attention)."""
    items = parse_layer_spec(spec, parameter)
    if all(map(is_layer_id, items)):
        return items
    attention_names = {i: [f"{name}.{inner}" for inner, _ in self_attentions(block)] for i, (name, block) in blocks.items()}
    ids: List[str] = []
    for item in items:
        ids.extend([item] if is_layer_id(item) else ids_named(attention_names, item, parameter))
    return list(dict.fromkeys(ids))
