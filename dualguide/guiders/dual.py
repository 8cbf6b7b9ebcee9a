"""CFG + TPG + NAG as one Modular Diffusers guider: ``TokenPerturbationGuidance``'s branches with NAG inside every
guided branch's backbone call (the cond and the TPG branch), as ``GuidedDenoiser`` guides the cond and TPG rows.

The NAG part is a ``NormalizedAttentionGuidance`` held by the guider (its K/V cache, window and checks); the TPG
branch's call carries both states, under the family's hooks for both (one ``hook_plan``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from ..callstate import GuidedCall
from ..families import layout_of
from ..hooks import HookSites
from .branches import MakeCall
from .nag import NEGATIVE, NormalizedAttentionGuidance, RuntimeNegative
from .tpg import TokenPerturbationGuidance


class DualGuidance(RuntimeNegative, TokenPerturbationGuidance):
    """Classifier-free guidance, Token Perturbation Guidance and Normalized Attention Guidance in one guider.

    ``pred = pred_uncond + guidance_scale (pred_cond - pred_uncond) + tpg_scale (pred_cond - pred_cond_tpg)``, with
    NAG in every cross-attention of the cond and TPG branches' calls. The arguments are ``TokenPerturbationGuidance``'s
    and ``NormalizedAttentionGuidance``'s (``nag_negative_prompt_embeds``: runtime, not config).
    """

    ignore_for_config = [NEGATIVE]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 5.0,
        tpg_scale: float = 3.0,
        tpg_layers: Optional[Union[str, List[str]]] = None,
        tpg_start: float = 0.0,
        tpg_stop: float = 1.0,
        nag_scale: float = 3.0,
        nag_tau: float = 2.5,
        nag_alpha: float = 0.5,
        nag_use_l1: bool = True,
        nag_start: float = 0.0,
        nag_stop: float = 1.0,
        guidance_rescale: float = 0.0,
        seed: Union[int, List[int]] = 0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        nag_negative_prompt_embeds: Optional[Tensor] = None,
    ) -> None:
        TokenPerturbationGuidance.__init__.__wrapped__(
            self, guidance_scale, tpg_scale, tpg_layers, tpg_start, tpg_stop, guidance_rescale, seed, start, stop, enabled
        )  # fmt: skip
        self.nag_guidance = NormalizedAttentionGuidance(
            guidance_scale=1.0, nag_scale=nag_scale, nag_tau=nag_tau, nag_alpha=nag_alpha, nag_use_l1=nag_use_l1,
            nag_start=nag_start, nag_stop=nag_stop, enabled=enabled, nag_negative_prompt_embeds=nag_negative_prompt_embeds,
        )  # fmt: skip
        self._both: Optional[Tuple[nn.Module, HookSites]] = None  # the bound model and its TPG + NAG hooks

    @property
    def nag_negative_prompt_embeds(self) -> Optional[Tensor]:
        return self.nag_guidance.nag_negative_prompt_embeds

    @nag_negative_prompt_embeds.setter
    def nag_negative_prompt_embeds(self, embeds: Optional[Tensor]) -> None:
        self.nag_guidance.nag_negative_prompt_embeds = embeds

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self.nag_guidance.enable() if self._enabled else self.nag_guidance.disable()
        self.nag_guidance.set_state(step, num_inference_steps, timestep)

    def check_inputs(self, batch: Optional[int]) -> None:
        super().check_inputs(batch)
        self.nag_guidance.check_inputs(batch)

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self.nag_guidance.bind(model)
        if self._both is None or self._both[0] is not model:
            self._both = (model, layout_of(model).hook_plan(model, self._tpg_blocks, (), self.nag_guidance.attentions))

    def branch_call(self, name: str) -> Optional[Tuple[HookSites, MakeCall]]:
        nag = self.nag_guidance.branch_call("pred_cond")  # None while NAG is off at this step
        if name == "pred_cond" or nag is None:
            return nag if name == "pred_cond" else super().branch_call(name)
        if name != "pred_cond_tpg":
            return None

        def both(args: tuple, kwargs: dict) -> GuidedCall:
            tpg = self._tpg_call(args, kwargs)
            return GuidedCall(tpg.rows, tpg=tpg.tpg, nag=self.nag_guidance.nag_call(args, kwargs).nag)

        return self._both[1], both
