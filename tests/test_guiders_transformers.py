"""TokenPerturbationGuidance on the generic transformer layouts (``dualguide.families.generic``): diffusers' modular core
denoise steps of Flux.2 [klein] base, Qwen-Image and Z-Image, entered with prompt embeds (no text encoder, no hub),
on transformers of diffusers' test widths and the released models' depths (so the default layers exist). TPG moves
the output, ``tpg_scale=0`` is diffusers' CFG exactly, the model is left as it was, the permuted block inputs equal a
test-side permutation of the same tokens, and bad layer ids and NAG are refused before any backbone call."""

from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch
from counting import rows_seen
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import Flux2KleinBaseAutoBlocks, QwenImageAutoBlocks, ZImageAutoBlocks

from dualguide.callstate import current_call
from dualguide.families import FLUX, layout_of
from dualguide.families.generic import FLUX2, QWEN_IMAGE, Z_IMAGE, depth_span
from dualguide.guiders import DualGuidance, NormalizedAttentionGuidance, TokenPerturbationGuidance
from dualguide.hooks import installed_count
from dualguide.layers import valid_ranges
from dualguide.rows import TokenPermutations

STEPS = 2
TEXT = 8  # prompt tokens of every case


def flux2(num_layers=5, num_single_layers=20):
    """diffusers' Flux.2 test widths; [klein] (base) 4B's depth by default: 5 dual-stream + 20 single-stream blocks."""
    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)  # fmt: skip


def qwen_image(**config):
    """diffusers' Qwen-Image test widths at Qwen-Image's depth: 60 dual-stream blocks."""
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=60, attention_head_dim=16,
                                       num_attention_heads=4, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4), **config)  # fmt: skip


def z_image():
    """diffusers' Z-Image test widths at Z-Image's depth: 30 main layers, 2 noise and 2 context refiners."""
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=30, n_refiner_layers=2,
                                    n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                    axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])  # fmt: skip


def embeds(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """One family: its tiny transformer, core denoise step and inputs, and what the test knows of its layout."""

    layout: object
    build: Callable
    blocks: type
    inputs: Dict[str, object]
    ranges: str  # the ids, as valid_ranges writes them
    default: str  # the default layers on this depth
    selection: str  # layers for the permutation check, in run order
    generated: int  # image tokens of the call (the generated latents' tokens)


CASES = {
    # 64 px with the step's VAE factor 8 and 2x2 packing: 4 x 4 = 16 generated tokens.
    "flux2": Case(FLUX2, flux2, Flux2KleinBaseAutoBlocks,
                  dict(prompt_embeds=embeds(1, TEXT, 32, seed=1), negative_prompt_embeds=embeds(1, TEXT, 32, seed=2), height=64, width=64),
                  "j0-j4, s0-s19", "j2-j4,s0-s3", "j0,j3,s0,s7,s19", 16),  # fmt: skip
    "qwenimage": Case(QWEN_IMAGE, qwen_image, QwenImageAutoBlocks,
                      dict(prompt_embeds=embeds(1, TEXT, 16, seed=1), prompt_embeds_mask=torch.ones(1, TEXT, dtype=torch.long),
                           negative_prompt_embeds=embeds(1, 5, 16, seed=2), negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
                           height=64, width=64),
                      "j0-j59", "j5-j20", "j0,j5,j30,j59", 16),  # fmt: skip
    # 96 px: 6 x 6 = 36 image tokens, padded to 64 with the pad token; the caption follows.
    "zimage": Case(Z_IMAGE, z_image, ZImageAutoBlocks,
                   dict(prompt_embeds=[embeds(TEXT, 16, seed=1)], negative_prompt_embeds=[embeds(5, 16, seed=2)], height=96, width=96),
                   "s0-s29", "s2-s10", "s0,s4,s29", 36),  # fmt: skip
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """A family's case with its transformer (seeded weights) and core denoise step."""
    spec = CASES[request.param]
    torch.manual_seed(0)
    transformer = spec.build()
    denoise = spec.blocks().sub_blocks["denoise"].init_pipeline()
    denoise.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    denoise.set_progress_bar_config(disable=True)
    return spec, transformer, denoise


def run(denoise, guider, steps=STEPS, **inputs):
    denoise.update_components(guider=guider)
    return denoise(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output="latents", **inputs)


def hooks_and_processors(model):
    """Every submodule's forward (pre-)hooks and every attention's processor, by name: equal means left as it was."""
    hooks = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
    return hooks, {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def test_layout_ids_and_default(case):
    spec, transformer, _ = case
    assert layout_of(transformer) is spec.layout
    assert valid_ranges(spec.layout.blocks(transformer)) == spec.ranges
    assert spec.layout.default_tpg_for(transformer) == spec.default == spec.layout.default_tpg_layers


@pytest.mark.parametrize(
    "stacks, expected",
    [
        ({"j": 5, "s": 20}, "j2-j4,s0-s3"),  # Flux.2 [klein] (base) 4B
        ({"j": 8, "s": 24}, "j2-j7,s0-s2"),  # Flux.2 [klein] (base) 9B
        ({"j": 8, "s": 48}, "j5-j7,s0-s11"),  # Flux.2 [dev]
        ({"j": 60}, "j5-j20"),  # Qwen-Image
        ({"s": 30}, "s2-s10"),  # Z-Image
        ({"d": 24, "m": 10, "u": 36}, "d6-d23"),  # SDXL: the rule gives the official TPG layers
        ({"j": 24}, "j2-j8"),  # SD3 medium: the project's default
        ({"j": 19, "s": 38}, "j5-j18,s0"),  # Flux.1: blocks 5-19 (its family keeps the dual-stream j5-j18)
    ],
)
def test_default_on_released_depths(stacks, expected):
    assert depth_span([f"{prefix}{i}" for prefix, count in stacks.items() for i in range(count)]) == expected


def test_default_on_released_flux2_models():
    """The computed default resolves on tiny models of every released Flux.2 depth."""
    for (dual, single), expected, count in [((5, 20), "j2-j4,s0-s3", 7), ((8, 24), "j2-j7,s0-s2", 9), ((8, 48), "j5-j7,s0-s11", 15)]:
        model = flux2(dual, single)
        assert FLUX2.default_tpg_for(model) == expected
        assert len(FLUX2.resolve(model, expected, "tpg_layers")) == count


def test_tpg_moves_output_and_leaves_model(case):
    """CFG + TPG (default layers): one backbone call per branch, 3 per step; the output moves; the model keeps exactly
    its processors and no hook is left on any submodule."""
    spec, transformer, denoise = case
    before = hooks_and_processors(transformer)
    cfg = run(denoise, ClassifierFreeGuidance(guidance_scale=4.0), **spec.inputs)
    with rows_seen(transformer) as rows:
        tpg = run(denoise, TokenPerturbationGuidance(guidance_scale=4.0, tpg_scale=3.0, seed=3), **spec.inputs)
    assert rows == [1] * 3 * STEPS
    assert (tpg - cfg).abs().max() > 0.1
    after = hooks_and_processors(transformer)
    assert after == before and not any(after[0][name] != ({}, {}) for name in after[0])
    assert not any(installed_count(m) for m in transformer.modules()) and current_call() is None


def test_tpg_scale_zero_is_cfg(case):
    spec, transformer, denoise = case
    expected = run(denoise, ClassifierFreeGuidance(guidance_scale=4.0), **spec.inputs)
    with rows_seen(transformer) as rows:
        latents = run(denoise, TokenPerturbationGuidance(guidance_scale=4.0, tpg_scale=0.0), **spec.inputs)
    assert rows == [1] * 2 * STEPS and torch.equal(latents, expected)


def loop_call(denoise, transformer, inputs):
    """The keyword arguments of the first backbone call diffusers' loop makes (one CFG step), cloned."""
    calls = []

    def record(module, args, kwargs):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
                      for k, v in kwargs.items()})  # fmt: skip

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(denoise, ClassifierFreeGuidance(guidance_scale=4.0), steps=1, **inputs)
    finally:
        handle.remove()
    return calls[0]


def block_inputs(blocks, call):
    """The output of ``call()`` and the token sequence entering each of ``blocks`` (after every pre-hook)."""
    seen = {}

    def record(module, args, kwargs, output):
        seen[module] = (args[0] if args else kwargs["hidden_states"]).clone()

    handles = [block.register_forward_hook(record, with_kwargs=True) for block in blocks]
    try:
        output = call()[0]  # Z-Image's: a list of [C, F, H, W]
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(output) if isinstance(output, list) else output, [seen[block] for block in blocks]


def tpg_branch(guider, transformer, kwargs, rows):
    """The TPG branch's backbone call as diffusers' loop makes it (CFG off: branches cond, TPG), by hand."""
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(999.0))
    branches = guider.prepare_inputs({"encoder_hidden_states": (torch.zeros(rows, 1, 1), None)})
    assert [getattr(b, "__guidance_identifier__") for b in branches] == ["pred_cond", "pred_cond_tpg"]
    guider.prepare_models(transformer)
    guider.cleanup_models(transformer)
    guider.prepare_models(transformer)
    try:
        return transformer(**kwargs)
    finally:
        guider.cleanup_models(transformer)


def permute_from(start, permutation):
    """A test-side forward pre-hook: the tokens ``start`` to ``start + len(permutation)`` of the block's input permuted."""

    def hook(module, args, kwargs):
        tokens = (args[0] if args else kwargs["hidden_states"]).clone()
        stop = start + len(permutation)
        tokens[:, start:stop] = tokens[:, start:stop][:, permutation]
        return ((tokens, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": tokens})

    return hook


def variant(spec, kwargs):
    """The loop's call with more to leave alone, and its rows: Qwen-Image with reference-image tokens after the generated
    ones, as Qwen-Image Edit's loop passes them (Flux.2 [klein]'s come from its image-conditioned loop); Z-Image with
    two images whose captions differ in length (the rows' sequences are padded differently after the image)."""
    if spec.layout is QWEN_IMAGE:
        reference = embeds(1, 6, kwargs["hidden_states"].shape[-1], seed=4)
        return {**kwargs, "hidden_states": torch.cat([kwargs["hidden_states"], reference], dim=1), "img_shapes": [[(1, 4, 4), (1, 2, 3)]]}, 1
    if spec.layout is Z_IMAGE:
        x, t, caption = kwargs["x"][0], kwargs["t"], kwargs["cap_feats"][0]
        return {**kwargs, "x": [x, 0.5 * x], "t": t.repeat(2), "cap_feats": [caption, caption[:5]]}, 2
    return kwargs, 1


@pytest.mark.parametrize("more", [False, True], ids=["plain", "references-or-batch"])
def test_permuted_inputs_equal_reference(case, more):
    """The inputs of the selected blocks in the TPG branch's call equal the same call without the guider, with a
    test-side pre-hook permuting the generated image tokens by the same permutations (drawn in run order): Flux.2's
    single blocks after the text tokens, Z-Image's before the padding; reference-image tokens, text and padding left."""
    spec, transformer, denoise = case
    inputs = dict(spec.inputs, image_latents=[embeds(1, 4, 2, 3, seed=4)]) if more and spec.layout is FLUX2 else spec.inputs
    kwargs, rows = variant(spec, loop_call(denoise, transformer, inputs)) if more else (loop_call(denoise, transformer, inputs), 1)
    ids = spec.selection.split(",")
    blocks = [block for _, block in spec.layout.resolve(transformer, ids, "tpg_layers")]
    guider = TokenPerturbationGuidance(guidance_scale=1.0, tpg_scale=3.0, tpg_layers=spec.selection, seed=7)
    output, guided = block_inputs(blocks, lambda: tpg_branch(guider, transformer, kwargs, rows))

    permutations = TokenPermutations(7)
    handles = [
        block.register_forward_pre_hook(permute_from(TEXT if i.startswith("s") and spec.layout is FLUX2 else 0,
                                                     permutations.get(index, spec.generated, torch.device("cpu"), slice(0, rows))),
                                        with_kwargs=True)
        for index, (i, block) in enumerate(zip(ids, blocks))
    ]  # fmt: skip
    try:
        expected_output, expected = block_inputs(blocks, lambda: transformer(**kwargs))
    finally:
        for handle in handles:
            handle.remove()
    _, plain = block_inputs(blocks[:1], lambda: transformer(**kwargs))
    assert not torch.equal(guided[0], plain[0])  # the first selected block's input was permuted
    assert max((a - b).abs().max().item() for a, b in zip(guided, expected)) <= 1e-5
    assert (output - expected_output).abs().max() <= 1e-5
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in transformer.modules())


def test_unknown_layers_refused_before_any_backbone_call(case):
    spec, transformer, denoise = case
    before = hooks_and_processors(transformer)
    with rows_seen(transformer) as rows, pytest.raises(ValueError, match=rf"tpg_layers: unknown layer id\(s\) j99, s99; valid ranges for this model: {spec.ranges}"):
        run(denoise, TokenPerturbationGuidance(guidance_scale=4.0, tpg_layers="j99,s99"), **spec.inputs)
    assert rows == [] and hooks_and_processors(transformer) == before


@pytest.mark.parametrize("kind", [NormalizedAttentionGuidance, DualGuidance])
def test_nag_refused_naming_the_family(case, kind):
    spec, transformer, denoise = case
    before = hooks_and_processors(transformer)
    guider = kind(guidance_scale=4.0, nag_scale=3.0, nag_negative_prompt_embeds=torch.zeros(1, 4, 16))
    with rows_seen(transformer) as rows, pytest.raises(ValueError, match=rf"NAG has no semantics on {spec.layout.title} "):
        run(denoise, guider, **spec.inputs)
    assert rows == [] and hooks_and_processors(transformer) == before


def test_only_handled_shapes_match():
    """Flux.1 keeps its family; a backbone with the lists but not the call, or the call but no blocks, gets layout_of's TypeError."""
    torch.manual_seed(0)
    flux1 = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])  # fmt: skip
    assert layout_of(flux1) is FLUX

    class Lists(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.single_transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def forward(self, hidden_states, encoder_hidden_states=None, img_ids=None, txt_ids=None):
            return hidden_states

    for model in (Lists(), torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match=f"no guider layout for a {type(model).__name__}; the guiders run on: .*Flux.2, Qwen-Image, Z-Image"):
            layout_of(model)


def test_calls_it_cannot_place_refused():
    """Calls and models whose generated tokens the layout cannot place are refused, naming what is not supported."""
    torch.manual_seed(0)
    tokens = torch.zeros(1, 16, 4)
    with pytest.raises(ValueError, match="kv_cache_mode"):
        FLUX2.branch_tokens(flux2(1, 1), (), dict(hidden_states=tokens, encoder_hidden_states=torch.zeros(1, 2, 32), kv_cache_mode="extract"))
    layered = qwen_image(use_layer3d_rope=True)
    with pytest.raises(ValueError, match="Qwen-Image Layered"):
        TokenPerturbationGuidance(guidance_scale=1.0).bind(layered)  # at every branch's prepare_models, before its call
    model = z_image()
    with pytest.raises(ValueError, match="Omni"):
        Z_IMAGE.branch_tokens(model, (), dict(x=[[torch.zeros(16, 1, 8, 8)]], t=torch.zeros(1), cap_feats=[[torch.zeros(3, 16)]]))
    with pytest.raises(ValueError, match="one size"):
        Z_IMAGE.branch_tokens(model, (), dict(x=[torch.zeros(16, 1, 8, 8), torch.zeros(16, 1, 4, 8)], t=torch.zeros(2), cap_feats=[]))
    assert Z_IMAGE.branch_tokens(model, (), dict(x=[torch.zeros(16, 1, 12, 12)] * 2, t=torch.zeros(2), cap_feats=[]))[0] == 2


def test_per_image_seeds_checked_before_any_backbone_call(case):
    """A per-image seed list longer or shorter than the batch is refused before any call, on every layout (Z-Image's
    loop gives its prompt embeds as a list of per-image tensors, whose length is the batch)."""
    spec, transformer, denoise = case
    for seed, batch in (([1, 2, 3], 2), ([1, 2], 1)):
        inputs = dict(spec.inputs, num_images_per_prompt=batch)
        with rows_seen(transformer) as rows, pytest.raises(ValueError, match=rf"seed has {len(seed)} per-image seeds but the batch has {batch} images"):
            run(denoise, TokenPerturbationGuidance(guidance_scale=4.0, seed=seed), **inputs)
        assert rows == []


def test_call_refused_at_its_start_leaves_no_hook():
    """A backbone call the layout refuses when it starts (Flux.2's kv_cache_mode) leaves no hook and no call state,
    before the guider is used again."""
    torch.manual_seed(0)
    transformer = flux2(1, 2)
    guider = TokenPerturbationGuidance(guidance_scale=1.0, tpg_scale=3.0, tpg_layers="j0,s0")
    kwargs = dict(hidden_states=torch.zeros(1, 16, 4), encoder_hidden_states=torch.zeros(1, 3, 32), timestep=torch.ones(1),
                  img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(3, 4), kv_cache_mode="extract")  # fmt: skip
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(999.0))
    guider.prepare_inputs({"encoder_hidden_states": (torch.zeros(1, 1, 1), None)})
    guider.prepare_models(transformer)
    guider.cleanup_models(transformer)
    guider.prepare_models(transformer)  # the TPG branch; the loop's cleanup_models never comes: the call raises
    with pytest.raises(ValueError, match="kv_cache_mode"):
        transformer(**kwargs)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in transformer.modules()) and current_call() is None
