"""Flux and Chroma prompt encoding: ``Conditioning``'s per-row guidance scale, ``encode_flux`` and ``encode_chroma``
equal to diffusers' own ``encode_prompt``, the NAG negative by the official NAG Flux pipeline's rule, bad input refused."""

import pytest
import torch
from diffusers import ChromaPipeline, FluxPipeline

from dualguide.conditioning import Conditioning, encode_chroma, encode_flux, encode_flux_nag_negative
from dualguide.tiny import tiny_t5_tokenizer, tiny_tokenizer

# ---------------------------------------------------------------------------------------------------
# Conditioning.guidance


def test_guidance_travels_with_its_rows_and_keeps_float32():
    rows = Conditioning(torch.randn(2, 3, 4), torch.randn(2, 5), guidance=torch.tensor([3.5, 4.0]))
    assert rows.select(slice(1, 2)).guidance.tolist() == [4.0]
    assert rows.repeat(2).guidance.tolist() == [3.5, 3.5, 4.0, 4.0]
    assert Conditioning.cat([rows, rows.select(slice(0, 1))]).guidance.tolist() == [3.5, 4.0, 3.5]
    half = rows.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == half.pooled_embeds.dtype == torch.float16
    assert half.guidance.dtype == torch.float32 and half.guidance.tolist() == [3.5, 4.0]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Conditioning(torch.randn(2, 3, 4), guidance=torch.tensor([1.0])), "guidance must have the same batch size"),
        (lambda: Conditioning(torch.randn(2, 3, 4), guidance=torch.tensor(1.0)), "guidance must be one scale per row"),
        (
            lambda: Conditioning.cat([Conditioning(torch.randn(1, 3, 4), guidance=torch.ones(1)), Conditioning(torch.randn(1, 3, 4))]),
            "guidance is given for some parts",
        ),
    ],
)
def test_guidance_of_another_batch_is_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------------------------------------------
# Tiny Flux and Chroma text stacks (the transformer, VAE and scheduler are not needed to encode prompts)

MAX_T5 = 16  # max_sequence_length of these tests
PROMPTS = ["a red circle", "a blue square on a long green table"]


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )  # fmt: skip
    return CLIPTextModel(config).eval(), tokenizer


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=37, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval(), tokenizer


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    (clip, clip_tokenizer), (t5, t5_tokenizer) = tiny_clip(), tiny_t5()
    return FluxPipeline(
        scheduler=None, vae=None, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
        transformer=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def chroma():
    torch.manual_seed(1)
    t5, tokenizer = tiny_t5()
    return ChromaPipeline(scheduler=None, vae=None, text_encoder=t5, tokenizer=tokenizer, transformer=None)


def diffusers_flux(pipe, prompt, prompt_2=None, images=1):
    """diffusers' own encoding: ``(prompt_embeds, pooled_prompt_embeds)``."""
    return pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, num_images_per_prompt=images, max_sequence_length=MAX_T5)[:2]


def assert_rows(conditioning, embeds, pooled):
    assert torch.equal(conditioning.prompt_embeds, embeds) and torch.equal(conditioning.pooled_embeds, pooled)


# ---------------------------------------------------------------------------------------------------
# encode_flux


def test_encode_flux_equals_diffusers_encode_prompt(flux):
    prompts_2 = ["a tall tree", "waves"]
    negatives, negatives_2 = ["blurry", "a cat"], ["dark", "noise noise"]
    positive, negative = encode_flux(
        flux, PROMPTS, prompts_2, negatives, negatives_2, num_images_per_prompt=2, with_negative=True, max_sequence_length=MAX_T5
    )
    embeds, pooled = diffusers_flux(flux, PROMPTS, prompts_2, images=2)
    assert embeds.shape == (4, MAX_T5, 24) and pooled.shape == (4, 32)
    assert_rows(positive, embeds, pooled)
    assert_rows(negative, *diffusers_flux(flux, negatives, negatives_2, images=2))
    assert not torch.equal(positive.prompt_embeds, negative.prompt_embeds)
    assert positive.guidance is None and positive.attention_mask is None
    only, none = encode_flux(flux, PROMPTS, prompts_2, num_images_per_prompt=2, max_sequence_length=MAX_T5)
    assert none is None and torch.equal(only.prompt_embeds, embeds)


def test_encode_flux_uses_given_embeds_and_repeats_them_per_image(flux):
    embeds, pooled = diffusers_flux(flux, PROMPTS)
    from_text, _ = encode_flux(flux, PROMPTS, num_images_per_prompt=3, max_sequence_length=MAX_T5)
    given, negative = encode_flux(
        flux, None, num_images_per_prompt=3, with_negative=True, max_sequence_length=MAX_T5, prompt_embeds=embeds,
        pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds.flip(0), negative_pooled_prompt_embeds=pooled.flip(0),
    )  # fmt: skip
    assert_rows(given, from_text.prompt_embeds, from_text.pooled_embeds)
    assert_rows(negative, embeds.flip(0).repeat_interleave(3, 0), pooled.flip(0).repeat_interleave(3, 0))


def test_encode_flux_negative_defaults_to_the_encoded_empty_string_and_a_string_serves_every_prompt(flux):
    _, empty = encode_flux(flux, PROMPTS, with_negative=True, max_sequence_length=MAX_T5)
    assert_rows(empty, *diffusers_flux(flux, ["", ""]))
    assert empty.prompt_embeds.abs().sum() > 0
    _, negative = encode_flux(flux, PROMPTS, negative_prompt="blurry", with_negative=True, max_sequence_length=MAX_T5)
    assert_rows(negative, *diffusers_flux(flux, ["blurry", "blurry"]))


# ---------------------------------------------------------------------------------------------------
# NAG's negative: the official NAG Flux pipeline's rule


def nag(flux, **options):
    return encode_flux_nag_negative(flux, 2, 2, max_sequence_length=MAX_T5, **options)


def test_nag_negative_given_embeds_are_used_per_image(flux):
    embeds, pooled = torch.randn(2, 5, 24), torch.randn(2, 32)
    got = nag(flux, nag_negative_prompt_embeds=embeds, nag_negative_pooled_prompt_embeds=pooled, nag_negative_prompt="x", negative_prompt="y")
    assert torch.equal(got[0], embeds.repeat_interleave(2, 0)) and torch.equal(got[1], pooled.repeat_interleave(2, 0))
    per_image = nag(flux, nag_negative_prompt_embeds=embeds.repeat(2, 1, 1), nag_negative_pooled_prompt_embeds=pooled.repeat(2, 1))
    assert torch.equal(per_image[0], embeds.repeat(2, 1, 1))


def test_nag_negative_prompt_is_encoded_with_its_own_t5_text(flux):
    got = nag(flux, nag_negative_prompt="blurry", nag_negative_prompt_2=["dark", "noise"], negative_prompt="a cat",
              negative_prompt_2="waves", true_cfg_negative=Conditioning(torch.zeros(4, 5, 24), torch.zeros(4, 32)))  # fmt: skip
    for tensor, expected in zip(got, diffusers_flux(flux, ["blurry", "blurry"], ["dark", "noise"], images=2)):
        assert torch.equal(tensor, expected)


def test_nag_negative_reuses_the_true_cfg_negative(flux):
    cfg = Conditioning(torch.randn(4, MAX_T5, 24), torch.randn(4, 32))  # not what "a cat" encodes to: reused, not re-encoded
    got = nag(flux, negative_prompt="a cat", true_cfg_negative=cfg)
    assert torch.equal(got[0], cfg.prompt_embeds) and torch.equal(got[1], cfg.pooled_embeds)


def test_nag_negative_without_true_cfg_encodes_the_negative_prompt_with_its_t5_text(flux):
    got = nag(flux, negative_prompt=["a cat", "blurry"], negative_prompt_2="waves", nag_negative_prompt_2="ignored")
    for tensor, expected in zip(got, diffusers_flux(flux, ["a cat", "blurry"], ["waves", "waves"], images=2)):
        assert torch.equal(tensor, expected)


def test_nag_negative_defaults_to_the_encoded_empty_string(flux):
    cfg = Conditioning(torch.randn(4, MAX_T5, 24), torch.randn(4, 32))  # true CFG from given embeds: no negative_prompt
    got = nag(flux, true_cfg_negative=cfg)
    for tensor, expected in zip(got, diffusers_flux(flux, ["", ""], images=2)):
        assert torch.equal(tensor, expected) and tensor.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "call, parameter",
    [
        (lambda pipe: encode_flux(pipe, PROMPTS, max_sequence_length=600), "max_sequence_length"),
        (lambda pipe: encode_flux_nag_negative(pipe, 2, 1, max_sequence_length=600), "max_sequence_length"),
        (lambda pipe: nag(pipe, nag_negative_prompt_embeds=torch.randn(3, 5, 24), nag_negative_pooled_prompt_embeds=torch.randn(3, 32)),
         "nag_negative_prompt_embeds has batch 3"),
        (lambda pipe: nag(pipe, nag_negative_prompt_embeds=torch.randn(2, 5, 24)), "nag_negative_pooled_prompt_embeds"),
        (lambda pipe: nag(pipe, nag_negative_prompt=["a", "b", "c"]), "nag_negative_prompt has 3 entries"),
        (lambda pipe: encode_flux(pipe, None, prompt_embeds=torch.randn(2, 5, 24)), "pooled_prompt_embeds"),
        (lambda pipe: encode_flux(pipe, PROMPTS, negative_prompt=["a"], with_negative=True, max_sequence_length=MAX_T5),
         "negative_prompt has 1 entries"),
    ],
)  # fmt: skip
def test_flux_bad_input_is_refused_naming_the_parameter(flux, call, parameter):
    with pytest.raises(ValueError, match=parameter):
        call(flux)


# ---------------------------------------------------------------------------------------------------
# Chroma


def test_encode_chroma_equals_diffusers_encode_prompt_with_its_mask(chroma):
    positive, negative = encode_chroma(
        chroma, PROMPTS, "blurry", num_images_per_prompt=2, with_negative=True, max_sequence_length=MAX_T5
    )
    embeds, _, mask, negative_embeds, _, negative_mask = chroma.encode_prompt(
        PROMPTS, "blurry", num_images_per_prompt=2, do_classifier_free_guidance=True, max_sequence_length=MAX_T5
    )
    assert torch.equal(positive.prompt_embeds, embeds) and torch.equal(positive.attention_mask, mask)
    assert torch.equal(negative.prompt_embeds, negative_embeds) and torch.equal(negative.attention_mask, negative_mask)
    assert positive.pooled_embeds is None and mask.shape == (4, MAX_T5) and mask.dtype == embeds.dtype
    tokens = [len(chroma.tokenizer(p).input_ids) for p in PROMPTS]  # with </s>; the first padding token is kept too
    assert mask.sum(1).tolist() == [min(MAX_T5, n + 1) for n in tokens for _ in range(2)] and tokens[0] + 1 < MAX_T5
    only, none = encode_chroma(chroma, PROMPTS, with_negative=False, max_sequence_length=MAX_T5)
    assert none is None and torch.equal(only.attention_mask, mask[::2])


def test_encode_chroma_given_embeds_need_their_mask_and_are_repeated_per_image(chroma):
    embeds, _, mask, *_ = chroma.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=MAX_T5)
    given, _ = encode_chroma(chroma, None, with_negative=False, num_images_per_prompt=2, prompt_embeds=embeds,
                             prompt_attention_mask=mask, max_sequence_length=MAX_T5)  # fmt: skip
    assert torch.equal(given.prompt_embeds, embeds.repeat_interleave(2, 0)) and torch.equal(given.attention_mask, mask.repeat_interleave(2, 0))
    with pytest.raises(ValueError, match="prompt_attention_mask must be given with prompt_embeds"):
        encode_chroma(chroma, None, with_negative=False, prompt_embeds=embeds, max_sequence_length=MAX_T5)
    with pytest.raises(ValueError, match="prompt_attention_mask must be"):
        encode_chroma(chroma, None, with_negative=False, prompt_embeds=embeds, prompt_attention_mask=mask[:, :3], max_sequence_length=MAX_T5)
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_chroma(chroma, PROMPTS, max_sequence_length=600)
