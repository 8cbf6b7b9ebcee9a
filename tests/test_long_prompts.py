"""Long prompts: windows of ``model_max_length`` tokens (BOS + content + EOS), concatenated; diffusers' results otherwise.

The tiny tokenizers are byte-level: a one-letter word is one token, so ``letters(n)`` is a prompt of
exactly ``n`` tokens whose every window decodes to a prompt of its own (the windows' references below).
"""

import string

import pytest
import torch

from dualguide import StableDiffusionXLTPGPipeline
from dualguide.conditioning import encode_nag_negative, encode_sdxl
from dualguide.tiny import tiny_tokenizer

SIZE = (32, 32)
W = 77  # the tiny tokenizers' model_max_length, as SDXL's
PER = W - 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The text encoders are tiny: one thread is much faster than two on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def letters(n, offset=0):
    return " ".join(string.ascii_lowercase[(i + offset) % 26] for i in range(n))


def window_text(n, index, per=PER):
    """The text of window ``index`` of ``letters(n)``."""
    return letters(max(0, min(per, n - per * index)), per * index)


def diffusers(pipe, prompt, negative_prompt=None, **kwargs):
    """diffusers' own encoding: (embeds, negative embeds, pooled, negative pooled)."""
    return pipe.encode_prompt(prompt, device="cpu", negative_prompt=negative_prompt, **kwargs)


def encode(pipe, prompt, negative_prompt=None, **kwargs):
    positive, negative = encode_sdxl(pipe, prompt, negative_prompt=negative_prompt, size=SIZE, device="cpu", **kwargs)
    if negative is None:
        return positive.prompt_embeds, None, positive.pooled_embeds, None
    return positive.prompt_embeds, negative.prompt_embeds, positive.pooled_embeds, negative.pooled_embeds


def assert_equal(actual, expected):
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected), (actual - expected).abs().max().item()


def test_letters_are_one_token_each(pipe):
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer.model_max_length == W
        assert len(tokenizer(letters(190), add_special_tokens=False, verbose=False).input_ids) == 190


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_short_prompt_is_diffusers_exactly(pipe, truncate, negative_prompt):
    expected = diffusers(pipe, "a red circle", negative_prompt)
    actual = encode(pipe, "a red circle", negative_prompt, truncate_long_prompts=truncate)
    for a, e in zip(actual, expected):
        assert_equal(a, e)
    # one full window (75 tokens) still fits
    assert_equal(encode(pipe, letters(PER), "blurry")[0], diffusers(pipe, letters(PER), "blurry")[0])


def test_long_prompt_is_encoded_window_by_window(pipe):
    n = 190  # 2.5 windows
    embeds, negative, pooled, negative_pooled = encode(pipe, letters(n), "blurry")
    assert embeds.shape == negative.shape == (1, 3 * W, 64)
    for index in range(3):
        window = diffusers(pipe, window_text(n, index), "blurry")
        assert_equal(embeds[:, index * W : (index + 1) * W], window[0])
    first = diffusers(pipe, window_text(n, 0), "blurry")
    assert_equal(pooled, first[2])
    # the truncated encoding is the first window alone; the others carry the rest of the prompt
    truncated = diffusers(pipe, letters(n), "blurry")
    assert truncated[0].shape == (1, W, 64)
    assert_equal(embeds[:, :W], truncated[0])
    assert_equal(pooled, truncated[2])
    empty = diffusers(pipe, "")[0]
    for index in (1, 2):
        assert not torch.allclose(embeds[:, index * W : (index + 1) * W], empty)
    # the negative is padded with empty windows to the positive's length; pooled from its first window
    assert_equal(negative[:, :W], first[1])
    assert_equal(negative[:, W:], empty.repeat(1, 2, 1))
    assert_equal(negative_pooled, first[3])


def test_long_negative_pads_the_positive(pipe):
    embeds, negative, pooled, negative_pooled = encode(pipe, "a red circle", letters(100))
    assert embeds.shape == negative.shape == (1, 2 * W, 64)
    short = diffusers(pipe, "a red circle", window_text(100, 0))
    assert_equal(embeds[:, :W], short[0])
    assert_equal(embeds[:, W:], diffusers(pipe, "")[0])
    assert_equal(pooled, short[2])
    assert_equal(negative[:, :W], short[1])
    assert_equal(negative[:, W:], diffusers(pipe, "", window_text(100, 1))[1])
    assert_equal(negative_pooled, short[3])


def test_force_zeros_negative_has_the_positive_shape(pipe):
    assert pipe.config.force_zeros_for_empty_prompt
    embeds, negative, pooled, negative_pooled = encode(pipe, letters(100))
    assert negative.shape == embeds.shape == (1, 2 * W, 64) and not negative.any()
    assert negative_pooled.shape == pooled.shape and not negative_pooled.any()
    # an empty negative string is really encoded, as in diffusers
    _, negative, _, _ = encode(pipe, letters(100), "")
    assert_equal(negative, diffusers(pipe, "", "")[1].repeat(1, 2, 1))


def test_truncate_long_prompts_is_diffusers_exactly(pipe):
    for negative_prompt in (None, letters(120, 3)):
        expected = diffusers(pipe, letters(190), negative_prompt)
        actual = encode(pipe, letters(190), negative_prompt, truncate_long_prompts=True)
        for a, e in zip(actual, expected):
            assert_equal(a, e)


def test_batch_shares_the_longest_window_count(pipe):
    prompts = [letters(30), letters(160), "a red circle"]
    negatives = ["blurry", "", letters(80)]
    embeds, negative, pooled, _ = encode(pipe, prompts, negatives)
    assert embeds.shape == negative.shape == (3, 3 * W, 64)
    first = diffusers(pipe, [window_text(30, 0), window_text(160, 0), "a red circle"], [negatives[0], "", window_text(80, 0)])
    assert_equal(embeds[:, :W], first[0])
    assert_equal(negative[:, :W], first[1])
    assert_equal(pooled, first[2])
    assert_equal(embeds[1:2, 2 * W :], diffusers(pipe, window_text(160, 2))[0])
    assert_equal(embeds[0:1, W:], diffusers(pipe, "")[0].repeat(1, 2, 1))


def test_prompt_2_goes_to_the_second_encoder(pipe):
    embeds, _, pooled, _ = encode(pipe, "a red circle", prompt_2=letters(100), with_negative=False)
    assert embeds.shape == (1, 2 * W, 64)
    first = diffusers(pipe, "a red circle", prompt_2=window_text(100, 0), do_classifier_free_guidance=False)
    assert_equal(embeds[:, :W], first[0])
    assert_equal(pooled, first[2])
    second = diffusers(pipe, "", prompt_2=window_text(100, 1), do_classifier_free_guidance=False)[0]
    assert_equal(embeds[:, W:], second)


def test_clip_skip(pipe):
    for a, e in zip(encode(pipe, "a red circle", "blurry", clip_skip=1), diffusers(pipe, "a red circle", "blurry", clip_skip=1)):
        assert_equal(a, e)
    embeds, negative, pooled, _ = encode(pipe, letters(100), "blurry", clip_skip=1)
    assert embeds.shape == negative.shape == (1, 2 * W, 64)
    first = diffusers(pipe, window_text(100, 0), "blurry", clip_skip=1)
    assert_equal(embeds[:, :W], first[0])
    assert_equal(negative[:, :W], first[1])  # diffusers' negative ignores clip_skip; so does the windowed one
    assert_equal(pooled, first[2])
    assert_equal(embeds[:, W:], diffusers(pipe, window_text(100, 1), clip_skip=1)[0])
    assert not torch.equal(embeds, encode(pipe, letters(100), "blurry")[0])


def test_num_images_per_prompt(pipe):
    expected = diffusers(pipe, ["a red circle", "a cat"], ["blurry", "dark"], num_images_per_prompt=2)
    actual = encode(pipe, ["a red circle", "a cat"], ["blurry", "dark"], num_images_per_prompt=2)
    for a, e in zip(actual, expected):
        assert_equal(a, e)
    once = encode(pipe, [letters(100), "a cat"], ["blurry", "dark"])
    twice = encode(pipe, [letters(100), "a cat"], ["blurry", "dark"], num_images_per_prompt=2)
    assert twice[0].shape == twice[1].shape == (4, 2 * W, 64)
    for a, e in zip(twice, once):
        assert_equal(a, e.repeat_interleave(2, dim=0))
    positive, negative = encode_sdxl(pipe, [letters(100), "a cat"], size=SIZE, num_images_per_prompt=3)
    assert positive.batch_size == negative.batch_size == positive.time_ids.shape[0] == 6


def test_given_embeds(pipe):
    long = encode(pipe, letters(190), "blurry")
    # long prompt_embeds given with a text negative: the negative is padded to their windows
    _, negative, _, _ = encode(pipe, None, "blurry", prompt_embeds=long[0], pooled_prompt_embeds=long[2])
    assert_equal(negative, long[1])
    # given embeds of both: used as they are
    given = encode(pipe, None, prompt_embeds=long[0], pooled_prompt_embeds=long[2], negative_prompt_embeds=long[1],
                   negative_pooled_prompt_embeds=long[3])  # fmt: skip
    for a, e in zip(given, long):
        assert_equal(a, e)
    short = diffusers(pipe, "a red circle")
    with pytest.raises(ValueError, match="prompt_embeds has 77 tokens"):
        encode(pipe, None, letters(100), prompt_embeds=short[0], pooled_prompt_embeds=short[2])
    with pytest.raises(ValueError, match="negative_prompt_embeds has 77 tokens"):
        encode(pipe, letters(100), negative_prompt_embeds=short[0], negative_pooled_prompt_embeds=short[2])


def test_nag_negative_has_its_own_length(pipe):
    long = encode_nag_negative(pipe, 1, 2, nag_negative_prompt=letters(190), device="cpu")
    assert long.shape == (2, 3 * W, 64)
    for index in range(3):
        assert_equal(long[:, index * W : (index + 1) * W], diffusers(pipe, window_text(190, index), num_images_per_prompt=2)[0])
    short = encode_nag_negative(pipe, 1, 1, nag_negative_prompt="blurry", device="cpu")
    assert_equal(short, diffusers(pipe, "blurry")[0])
    two = encode_nag_negative(pipe, 2, 1, negative_prompt=["blurry", letters(100)], device="cpu", clip_skip=1)
    assert two.shape == (2, 2 * W, 64)
    assert_equal(two[:, :W], diffusers(pipe, ["blurry", window_text(100, 0)], clip_skip=1)[0])
    cut = encode_nag_negative(pipe, 1, 1, nag_negative_prompt=letters(190), device="cpu", truncate_long_prompts=True)
    assert_equal(cut, diffusers(pipe, letters(190))[0])


def test_window_is_the_tokenizers_model_max_length(components):
    """The embedded model's tokenizers have model_max_length 16: windows of 14 tokens."""
    small = StableDiffusionXLTPGPipeline(
        **{**components, "tokenizer": tiny_tokenizer(model_max_length=16), "tokenizer_2": tiny_tokenizer(model_max_length=16)},
        add_watermarker=False,
    )
    embeds, negative, pooled, _ = encode(small, letters(30), "blurry")
    assert embeds.shape == negative.shape == (1, 3 * 16, 64)
    for index in range(3):
        window = diffusers(small, window_text(30, index, per=14), "blurry")
        assert_equal(embeds[:, index * 16 : (index + 1) * 16], window[0])
        if index == 0:
            assert_equal(pooled, window[2])
            assert_equal(negative[:, :16], window[1])
    for a, e in zip(encode(small, letters(14), "blurry"), diffusers(small, letters(14), "blurry")):
        assert_equal(a, e)


def test_refiner_layout_without_the_first_encoder(components):
    refiner = StableDiffusionXLTPGPipeline(**{**components, "tokenizer": None, "text_encoder": None}, add_watermarker=False)
    for a, e in zip(encode(refiner, "a red circle", "blurry"), diffusers(refiner, "a red circle", "blurry")):
        assert_equal(a, e)
    embeds, negative, pooled, _ = encode(refiner, letters(100), "blurry")
    assert embeds.shape == negative.shape == (1, 2 * W, 32)
    first = diffusers(refiner, window_text(100, 0), "blurry")
    assert_equal(embeds[:, :W], first[0])
    assert_equal(pooled, first[2])


def test_lora_scale_is_set_as_diffusers_sets_it(pipe, monkeypatch):
    import diffusers.models.lora as lora

    calls = []
    monkeypatch.setattr(lora, "adjust_lora_scale_text_encoder", lambda encoder, scale: calls.append((encoder, scale)))
    monkeypatch.setattr(pipe, "_lora_scale", None, raising=False)
    encode(pipe, letters(100), "blurry", lora_scale=0.5)
    assert pipe._lora_scale == 0.5
    assert calls == [(pipe.text_encoder, 0.5), (pipe.text_encoder_2, 0.5)]


def test_textual_inversion_tokens_are_expanded_before_windowing(components):
    import copy

    parts = {name: copy.deepcopy(components[name]) for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    ti = StableDiffusionXLTPGPipeline(**{**components, **parts}, add_watermarker=False)
    torch.manual_seed(0)
    ti.load_textual_inversion(torch.randn(4, 32), token="<cat>", text_encoder=ti.text_encoder, tokenizer=ti.tokenizer)
    ti.load_textual_inversion(torch.randn(4, 32), token="<cat>", text_encoder=ti.text_encoder_2, tokenizer=ti.tokenizer_2)
    prompt = letters(72) + " <cat>"  # 73 tokens as typed, 76 once "<cat>" becomes its 4 vectors
    assert len(ti.tokenizer(prompt, add_special_tokens=False).input_ids) == 73
    embeds, _, pooled, _ = encode(ti, prompt, "blurry")
    assert embeds.shape == (1, 2 * W, 64)
    truncated = diffusers(ti, prompt, "blurry")
    assert_equal(embeds[:, :W], truncated[0])
    assert_equal(pooled, truncated[2])
    assert_equal(embeds[:, W:], diffusers(ti, "<cat>_3")[0])
