"""``dualguide.guiders.with_nag_negative_prompt``: NAG's negative as text on modular SDXL / SD3, encoded by the
pipeline's own text-encoder step; equal to the guider given those embeds, with CFG on and off; bad input refused
naming ``nag_negative_prompt`` before any backbone call."""

import pytest
import torch
from conftest import SIZE, modular_pipeline
from counting import rows_seen
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusion3AutoBlocks, StableDiffusionXLAutoBlocks, WanBlocks

from dualguide.guiders import (
    DualGuidance,
    NormalizedAttentionGuidance,
    StableDiffusionXLNAGNegativePromptStep,
    TokenPerturbationGuidance,
    WanNAGNegativePromptStep,
    one_forward,
    with_nag_negative_prompt,
)

PROMPT = "a red circle"
NEGATIVE = "blurry dark"
STEPS = 2


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def plain(components):
    """diffusers' modular SDXL with the tiny components."""
    return modular_pipeline(StableDiffusionXLAutoBlocks(), components)


@pytest.fixture(scope="module")
def texted(components):
    """The same pipeline with the NAG negative-text step."""
    return modular_pipeline(with_nag_negative_prompt(StableDiffusionXLAutoBlocks()), components)


def encoded(pipeline, texts, per_prompt=1):
    """``texts`` through the pipeline's own text-encoder step, run alone (one condition: no CFG negative), each
    prompt's row repeated ``per_prompt`` times."""
    encoder = pipeline.blocks.sub_blocks["text_encoder"].init_pipeline()
    names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    encoder.update_components(**{name: getattr(pipeline, name) for name in names if hasattr(pipeline, name)},
                              guider=ClassifierFreeGuidance(guidance_scale=1.0))  # fmt: skip
    extra = {"max_sequence_length": 16} if hasattr(pipeline, "text_encoder_3") else {}
    return encoder(prompt=texts, output="prompt_embeds", **extra).repeat_interleave(per_prompt, dim=0)


def run(pipeline, guider, prompt=PROMPT, per_prompt=1, **kwargs):
    pipeline.update_components(guider=guider)
    settings = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, num_images_per_prompt=per_prompt, generator=generator())
    return pipeline(prompt=prompt, **settings, **kwargs, output=["latents", "nag_negative_prompt_embeds"])


@pytest.mark.parametrize(
    "prompt, negative, per_prompt",
    [(PROMPT, NEGATIVE, 1), ([PROMPT, "a blue square"], NEGATIVE, 2), ([PROMPT, "a blue square"], [NEGATIVE, "noisy"], 1)],
    ids=["one", "one-text-two-prompts-two-images", "one-text-per-prompt"],
)
def test_block_embeds_equal_the_pipeline_encoder(texted, prompt, negative, per_prompt):
    guider = NormalizedAttentionGuidance(guidance_scale=5.0)
    out = run(texted, guider, prompt, per_prompt, nag_negative_prompt=negative)
    prompts = len(prompt) if isinstance(prompt, list) else 1
    texts = negative if isinstance(negative, list) else [negative] * prompts
    expected = encoded(texted, texts, per_prompt)
    assert expected.shape[0] == prompts * per_prompt
    assert torch.equal(out["nag_negative_prompt_embeds"], expected)
    assert guider.nag_negative_prompt_embeds is out["nag_negative_prompt_embeds"]
    assert (expected - encoded(texted, [prompt] if isinstance(prompt, str) else prompt, per_prompt)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", [NormalizedAttentionGuidance, DualGuidance])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "cfg-off"])
def test_text_run_equals_embeds_run(plain, texted, unet, kind, guidance_scale):
    """A run with ``nag_negative_prompt`` equals one whose guider is given the same text's embeds (exactly), per
    branch and through one_forward; with CFG off (one condition, no CFG negative encoded) NAG still gets it."""
    settings = dict(guidance_scale=guidance_scale, nag_scale=4.0, **({"seed": 3} if kind is DualGuidance else {}))
    with rows_seen(unet) as rows:
        latents = run(texted, kind(**settings), nag_negative_prompt=NEGATIVE)["latents"]
    assert rows == [1] * STEPS * ((2 if guidance_scale > 1 else 1) + (kind is DualGuidance))
    given = run(plain, kind(**settings, nag_negative_prompt_embeds=encoded(plain, [NEGATIVE])))["latents"]
    assert torch.equal(latents, given)
    other = run(texted, kind(**settings), nag_negative_prompt="noisy")["latents"]
    assert (other - latents).abs().max() > 1e-3  # the text matters
    packed = one_forward(texted)
    with rows_seen(unet) as rows:
        one_call = run(packed, kind(**settings), nag_negative_prompt=NEGATIVE)["latents"]
    assert len(rows) == STEPS and (one_call - latents).abs().max() <= 1e-4


def test_text_run_equals_project_pipeline(texted, pipe):
    """The negative as StableDiffusionXLTPGPipeline encodes ``nag_negative_prompt``: the same latents."""
    latents = run(texted, NormalizedAttentionGuidance(guidance_scale=5.0, nag_scale=4.0), nag_negative_prompt=NEGATIVE)["latents"]
    expected = pipe(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator(), output_type="latent",
                    guidance_scale=5.0, tpg_scale=0.0, do_nag=True, nag_scale=4.0, nag_negative_prompt=NEGATIVE).images  # fmt: skip
    assert (latents - expected).abs().max() <= 1e-4


def test_without_text_the_guider_keeps_its_negative(texted):
    negative = torch.randn(1, 77, 64, generator=generator(5))
    guider = NormalizedAttentionGuidance(guidance_scale=1.0, nag_negative_prompt_embeds=negative)
    out = run(texted, guider)
    assert out["nag_negative_prompt_embeds"] is negative and guider.nag_negative_prompt_embeds is negative
    assert run(texted, ClassifierFreeGuidance(guidance_scale=5.0))["nag_negative_prompt_embeds"] is None


@pytest.mark.parametrize(
    "prompt, negative, guider, error",
    [
        (PROMPT, [NEGATIVE, "noisy"], NormalizedAttentionGuidance(), ValueError),  # two negatives, one prompt
        ([PROMPT, PROMPT], ["a", "b", "c"], NormalizedAttentionGuidance(), ValueError),
        (PROMPT, 3, NormalizedAttentionGuidance(), TypeError),
        (PROMPT, [NEGATIVE, 3], NormalizedAttentionGuidance(), TypeError),
        (PROMPT, [], NormalizedAttentionGuidance(), TypeError),
        (PROMPT, NEGATIVE, TokenPerturbationGuidance(), ValueError),  # a guider without NAG
    ],
)
def test_bad_input_refused_before_any_backbone_call(texted, unet, prompt, negative, guider, error):
    with rows_seen(unet) as rows, rows_seen(texted.text_encoder) as encoded_rows, pytest.raises(error, match="nag_negative_prompt"):
        run(texted, guider, prompt, nag_negative_prompt=negative)
    assert rows == []
    assert encoded_rows == [1 if isinstance(prompt, str) else 2]  # the prompt only: the negative was refused before encoding


def test_with_nag_negative_prompt_blocks():
    blocks = StableDiffusionXLAutoBlocks()
    added = with_nag_negative_prompt(blocks)
    assert list(added.sub_blocks)[:2] == ["text_encoder", "nag_negative_prompt"] and "nag_negative_prompt" not in blocks.sub_blocks
    assert isinstance(added.sub_blocks["nag_negative_prompt"], StableDiffusionXLNAGNegativePromptStep)
    assert "nag_negative_prompt" in added.input_names and "nag_negative_prompt" not in blocks.input_names
    assert list(with_nag_negative_prompt(added).sub_blocks) == list(added.sub_blocks)  # once only
    assert [spec.name for spec in added.expected_components] == [spec.name for spec in blocks.expected_components]
    wan = with_nag_negative_prompt(WanBlocks()).sub_blocks["nag_negative_prompt"]
    assert isinstance(wan, WanNAGNegativePromptStep) and "num_videos_per_prompt" in wan.input_names
    with pytest.raises(TypeError, match="text-encoder step"):
        with_nag_negative_prompt(blocks.sub_blocks["denoise"])
    with pytest.raises(TypeError, match="SequentialPipelineBlocks"):
        with_nag_negative_prompt(blocks.sub_blocks["text_encoder"])


def test_sd3_text_run_equals_embeds_run():
    """SD3 (NAG runs through one_forward there): the block's embeds are the SD3 text-encoder step's, and the text run
    equals the run with those embeds given, with CFG off."""
    from dualguide.tiny import build_tiny_sd3

    parts = build_tiny_sd3("sd3")

    def pipeline(blocks):
        built = blocks.init_pipeline()
        built.update_components(**parts)
        built.set_progress_bar_config(disable=True)
        return one_forward(built)

    texted, plain = pipeline(with_nag_negative_prompt(StableDiffusion3AutoBlocks())), pipeline(StableDiffusion3AutoBlocks())
    settings = dict(guidance_scale=1.0, nag_scale=4.0, nag_tau=2.0, nag_alpha=0.25)
    with rows_seen(parts["transformer"]) as rows:
        out = run(texted, NormalizedAttentionGuidance(**settings), nag_negative_prompt=NEGATIVE, max_sequence_length=16)
    assert rows == [1] * STEPS
    expected = encoded(texted, [NEGATIVE])
    assert torch.equal(out["nag_negative_prompt_embeds"], expected)
    given = run(plain, NormalizedAttentionGuidance(**settings, nag_negative_prompt_embeds=expected), max_sequence_length=16)
    assert torch.equal(out["latents"], given["latents"])
    without = run(plain, ClassifierFreeGuidance(guidance_scale=1.0), max_sequence_length=16)
    assert (out["latents"] - without["latents"]).abs().max() > 1e-3


def test_wan_block_embeds_equal_the_encoder():
    """Wan's step (UMT5, rows repeated num_videos_per_prompt times), on the text blocks alone: a tiny UMT5."""
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from transformers import UMT5Config, UMT5EncoderModel

    from dualguide.tiny import tiny_t5_tokenizer

    blocks = with_nag_negative_prompt(WanBlocks())
    text = SequentialPipelineBlocks.from_blocks_dict({name: blocks.sub_blocks[name] for name in ("text_encoder", "nag_negative_prompt")})
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()
    pipeline = text.init_pipeline()
    guider = NormalizedAttentionGuidance(guidance_scale=5.0)
    pipeline.update_components(text_encoder=encoder, tokenizer=tokenizer, guider=guider)
    out = pipeline(prompt=[PROMPT, "a blue square"], nag_negative_prompt=NEGATIVE, num_videos_per_prompt=2, max_sequence_length=16,
                   output="nag_negative_prompt_embeds")  # fmt: skip
    alone = blocks.sub_blocks["text_encoder"].init_pipeline()
    # CFG on: diffusers 0.42.1's WanTextEncoderStep raises with one condition (its negative embeds unbound)
    alone.update_components(text_encoder=encoder, tokenizer=tokenizer, guider=ClassifierFreeGuidance(guidance_scale=5.0))
    expected = alone(prompt=[NEGATIVE] * 2, max_sequence_length=16, output="prompt_embeds").repeat_interleave(2, dim=0)
    assert expected.shape[0] == 4 and torch.equal(out, expected) and guider.nag_negative_prompt_embeds is out


def test_generic_step_over_another_encoder(texted, components):
    """A text-encoder step of no known family gets the generic step over that very step: the same embeds."""
    from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep

    from dualguide.guiders import NAGNegativePromptStep

    class OwnEncoderStep(StableDiffusionXLTextEncoderStep):
        pass

    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks["text_encoder"] = OwnEncoderStep()
    step = with_nag_negative_prompt(blocks).sub_blocks["nag_negative_prompt"]
    assert type(step) is NAGNegativePromptStep and "num_images_per_prompt" in step.input_names
    pipeline = with_nag_negative_prompt(blocks).init_pipeline()
    pipeline.update_components(**components)
    pipeline.set_progress_bar_config(disable=True)
    out = run(pipeline, NormalizedAttentionGuidance(guidance_scale=1.0), nag_negative_prompt=NEGATIVE)
    assert torch.equal(out["nag_negative_prompt_embeds"], encoded(texted, [NEGATIVE]))
    with pytest.raises(TypeError, match="encoder"):
        NAGNegativePromptStep()


def tiny_umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    from dualguide.tiny import WAN_TEXT_DIM, tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=WAN_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return UMT5EncoderModel(config).eval(), tokenizer


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_wan_text_negative_runs_with_cfg_on_and_off(guidance_scale):
    """Wan from text to latents with nag_negative_prompt: with CFG off (one condition), diffusers' own
    WanTextEncoderStep raises; the blocks from with_nag_negative_prompt run, and equal a run given the embeds."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from diffusers.modular_pipelines import SequentialPipelineBlocks

    from dualguide.guiders import WanOneConditionTextEncoderStep
    from dualguide.tiny import tiny_wan_transformer_config, wan_scheduler_config

    encoder, tokenizer = tiny_umt5()
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**tiny_wan_transformer_config(num_layers=4)).eval()
    blocks = with_nag_negative_prompt(WanBlocks())
    assert type(blocks.sub_blocks["text_encoder"]) is WanOneConditionTextEncoderStep
    assert type(WanBlocks().sub_blocks["text_encoder"]) is not WanOneConditionTextEncoderStep  # the original is left as it was

    def run(blocks, guider, **kwargs):
        no_decoder = SequentialPipelineBlocks.from_blocks_dict({k: v for k, v in blocks.sub_blocks.items() if k != "decode"})
        pipeline = no_decoder.init_pipeline()
        pipeline.update_components(text_encoder=encoder, tokenizer=tokenizer, transformer=transformer, guider=guider,
                                   scheduler=UniPCMultistepScheduler(**wan_scheduler_config()))  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(prompt=PROMPT, num_inference_steps=2, height=32, width=32, num_frames=5, max_sequence_length=16,
                        generator=torch.Generator().manual_seed(0), output="latents", **kwargs)  # fmt: skip

    settings = dict(guidance_scale=guidance_scale, nag_scale=3.0, nag_alpha=0.25)
    texted = NormalizedAttentionGuidance(**settings)
    latents = run(blocks, texted, nag_negative_prompt=NEGATIVE)
    given = NormalizedAttentionGuidance(**settings, nag_negative_prompt_embeds=texted.nag_negative_prompt_embeds.clone())
    plain = SequentialPipelineBlocks.from_blocks_dict({k: v for k, v in blocks.sub_blocks.items() if k != "nag_negative_prompt"})
    assert torch.equal(latents, run(plain, given))
    without = run(plain, NormalizedAttentionGuidance(guidance_scale=guidance_scale, nag_scale=1.0))
    assert (latents - without).abs().max() > 1e-4
    if guidance_scale == 1.0:
        with pytest.raises(UnboundLocalError):  # diffusers 0.42.1's own step with one condition
            run(WanBlocks(), NormalizedAttentionGuidance(guidance_scale=1.0, nag_scale=1.0))
