"""Token Perturbation Guidance as a Modular Diffusers guider: CFG plus a TPG branch, run by diffusers' own loops.

The TPG branch's backbone call is one guided call whose rows are all ``"tpg"`` rows: the family adapter's
``shuffle_tokens`` pre-hooks (its ``hook_plan``) permute the image tokens entering each selected block, with one
permutation per block and step drawn from ``seed`` by ``dualguide.rows.TokenPermutations`` in the order the blocks
run, as ``GuidedDenoiser`` draws them. The other branches' calls pass through.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from ..callstate import GuidedCall, TPGCall
from ..checks import check_layer_spec, check_number
from ..families import BlockLayout, layout_of
from ..hooks import HookSites
from ..layers import parse_layer_ids
from ..rows import CallRows, TokenPermutations
from .branches import BranchGuidance, MakeCall, check_seed, check_window, in_window


def call_device(args: tuple, kwargs: dict):
    """The device of a backbone call's inputs (its first tensor argument; a list of tensors counts)."""
    for value in (*args, *kwargs.values()):
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, Tensor):
            return value.device
    raise TypeError("a guided branch's backbone call must take its latents as a tensor (or a list of tensors)")


class TokenPerturbationGuidance(BranchGuidance):
    """Classifier-free guidance plus Token Perturbation Guidance (arXiv 2506.10036) for diffusers' modular pipelines.

    ``pred = pred_uncond + guidance_scale (pred_cond - pred_uncond) + tpg_scale (pred_cond - pred_cond_tpg)`` (CFG
    on for ``guidance_scale > 1``, then ``guidance_rescale`` as diffusers), computed in float32; ``pred_cond_tpg`` is
    the cond branch with the image tokens entering each block of ``tpg_layers`` shuffled.

    Args:
        guidance_scale: CFG scale; ``<= 1`` leaves the uncond branch out.
        tpg_scale: TPG scale; 0 leaves the TPG branch out (then this guider is ``ClassifierFreeGuidance``).
        tpg_layers: layer ids or ranges of the backbone (``"d6-d23"``, ``["d2", "m0"]``, ``"j2-j8"``); the model
            family's default when None (SDXL ``d6-d23``, SD 1.x/2.x ``d4-d5``, SD3 ``j2-j8``).
        tpg_start, tpg_stop: the fractions of the run's steps with TPG on (step ``i`` of ``n`` when
            ``int(tpg_start n) <= i < int(tpg_stop n)``); ``start`` / ``stop`` do the same for CFG.
        guidance_rescale: Lin et al.'s rescale of the CFG result (0 = none, 1 = full).
        seed: the permutations' seed, one int (one permutation per block and step for the whole batch, as the official
            code) or one per image. A run restarts the streams, so the same seed gives the same run.
            ``StableDiffusionXLTPGPipeline(generator=g)`` draws its permutations from
            ``dualguide.pipelines.guided.seeds_from(g)`` read after its initial noise: that value here gives the same
            permutations.
        enabled: as diffusers' guiders.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_tpg"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 5.0,
        tpg_scale: float = 3.0,
        tpg_layers: Optional[Union[str, List[str]]] = None,
        tpg_start: float = 0.0,
        tpg_stop: float = 1.0,
        guidance_rescale: float = 0.0,
        seed: Union[int, List[int]] = 0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ) -> None:
        self._init_cfg(guidance_scale, guidance_rescale, start, stop, enabled)
        self.tpg_scale = check_number(tpg_scale, "tpg_scale", 0.0)
        self.tpg_layers = None if tpg_layers is None else parse_layer_ids(check_layer_spec(tpg_layers, "tpg_layers"), "tpg_layers")
        if self.tpg_layers == [] and self.tpg_scale > 0:
            raise ValueError("tpg_layers is empty while tpg_scale > 0; give ids such as 'd6-d23', or None for the family's default")
        self.tpg_start, self.tpg_stop = check_window(tpg_start, tpg_stop, "tpg_start", "tpg_stop")
        self.seed = check_seed(seed)
        self._permutations = TokenPermutations(self.seed)
        self._model: Optional[nn.Module] = None
        self._family: Optional[BlockLayout] = None
        self._tpg_blocks: Dict[nn.Module, int] = {}  # module TPG permutes -> its index among the selected blocks
        self._sites = HookSites()

    def _tpg_enabled(self) -> bool:
        return self._enabled and self.tpg_scale > 0 and in_window(self.tpg_start, self.tpg_stop, self._step, self._num_inference_steps)

    def branch_names(self) -> List[str]:
        return ["pred_cond"] + ["pred_uncond"] * self._cfg_enabled() + ["pred_cond_tpg"] * self._tpg_enabled()

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:  # a new run: the streams start again from the seed
            self._permutations = TokenPermutations(self.seed)
        self._permutations.new_step()

    def check_inputs(self, batch: Optional[int]) -> None:
        if self._permutations.per_image and batch is not None and "pred_cond_tpg" in self._branches and batch != len(self.seed):
            raise ValueError(f"seed has {len(self.seed)} per-image seeds but the batch has {batch} images")

    def bind(self, model: nn.Module) -> None:
        """The family adapter, the selected blocks and their hooks on ``model`` (``tpg_layers`` checked against it)."""
        if self.tpg_scale == 0 or model is self._model:
            return
        family = layout_of(model)
        layers = family.default_tpg_for(model) if self.tpg_layers is None else self.tpg_layers
        blocks = family.resolve(model, layers, "tpg_layers")
        self._tpg_blocks = {family.tpg_module(block): index for index, (_, block) in enumerate(blocks)}
        self._sites = family.hook_plan(model, self._tpg_blocks, (), ())
        self._family, self._model = family, model

    def branch_call(self, name: str) -> Optional[Tuple[HookSites, MakeCall]]:
        return (self._sites, self._tpg_call) if name == "pred_cond_tpg" else None

    def _tpg_call(self, args: tuple, kwargs: dict) -> GuidedCall:
        """The TPG branch's call: all its rows are TPG rows, each selected block with this step's permutation."""
        rows, counts = self._family.branch_tokens(self._model, args, kwargs)
        images, device = slice(0, rows), call_device(args, kwargs)
        permutations = {
            block: self._permutations.get(self._tpg_blocks[block], tokens, device, images)
            for block, tokens in counts.items()
            if block in self._tpg_blocks
        }
        return GuidedCall(CallRows({"tpg": slice(0, rows)}), tpg=TPGCall(permutations))

    def forward(self, pred_cond: Tensor, pred_uncond: Optional[Tensor] = None, pred_cond_tpg: Optional[Tensor] = None):
        perturbed = [(self.tpg_scale, pred_cond_tpg)] if self._tpg_enabled() else []
        return self.combine(pred_cond, pred_uncond, perturbed)
