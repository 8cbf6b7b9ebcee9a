"""SD3 / SD3.5 building blocks: the tiny models in diffusers' own pipeline, prompt encoding (equal to diffusers'),
the NAG negative's rule, and the family read from a folder or refused for a single file."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from safetensors.torch import save_file

from dualguide.conditioning import encode_sd3, encode_sd3_nag_negative
from dualguide.loading import FAMILY_PIPELINES, detect_family
from dualguide.tiny import build_tiny_sd3, tiny_t5_tokenizer

MAX_T5 = 16  # max_sequence_length of these tests: L = 77 CLIP tokens + 16 T5 tokens
PROMPTS = ["a red circle", "a blue square"]


def sd3_pipe(layout="sd3", with_t5=True):
    pipe = StableDiffusion3Pipeline(**build_tiny_sd3(layout, with_t5=with_t5))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return sd3_pipe()


@pytest.fixture(scope="module")
def pipe_no_t5():
    return sd3_pipe(with_t5=False)


def generate(pipe, prompt="a red circle"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


# ---------------------------------------------------------------------------------------------------
# Tiny models


@pytest.mark.parametrize("layout", ["sd3", "sd3.5"])
@pytest.mark.parametrize("with_t5", [True, False])
def test_both_tiny_layouts_generate_in_diffusers_own_pipeline(layout, with_t5):
    pipe = sd3_pipe(layout, with_t5)
    config = pipe.transformer.config
    assert len(pipe.transformer.transformer_blocks) == 10 and config.patch_size == 2
    assert config.in_channels == pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0
    dual = [block.attn2 is not None for block in pipe.transformer.transformer_blocks]
    if layout == "sd3.5":
        assert config.qk_norm == "rms_norm" and dual == [True] * 5 + [False] * 5
    else:
        assert config.qk_norm is None and not any(dual)
    assert (pipe.text_encoder_3 is not None) == with_t5 and (pipe.tokenizer_3 is not None) == with_t5
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0.01
    assert (generate(pipe) == image).all()


def test_the_layouts_differ_and_the_seed_decides_the_weights():
    sd3, sd35 = build_tiny_sd3("sd3")["transformer"], build_tiny_sd3("sd3.5")["transformer"]
    assert set(sd35.state_dict()) > set(sd3.state_dict())  # qk-norm and the second attention
    again, other = build_tiny_sd3("sd3")["transformer"].state_dict(), build_tiny_sd3("sd3", seed=1)["transformer"].state_dict()
    assert all(torch.equal(value, again[name]) for name, value in sd3.state_dict().items())
    assert not torch.equal(sd3.state_dict()["pos_embed.proj.weight"], other["pos_embed.proj.weight"])
    with pytest.raises(ValueError, match="layout"):
        build_tiny_sd3("sd4")


def test_the_t5_tokenizer_is_built_offline_and_pads_to_512():
    tokenizer = tiny_t5_tokenizer(["circle"])
    assert tokenizer.model_max_length >= 512
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red circle").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581a", "\u2581r", "e", "d", "\u2581circle", "</s>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tokenizer("").input_ids == [1]
    padded = tokenizer(["a", "a red circle"], padding="max_length", max_length=512, truncation=True).input_ids
    assert [len(row) for row in padded] == [512, 512] and padded[0][2:] == [0] * 510


@pytest.mark.parametrize("with_t5", [True, False])
def test_save_pretrained_and_from_pretrained_round_trip_offline(tmp_path, with_t5):
    pipe = sd3_pipe("sd3.5", with_t5)
    pipe.save_pretrained(tmp_path)
    # a folder saved without T5 says so with nulls, which diffusers' loader wants passed explicitly
    options = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True, **options)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.config.qk_norm == "rms_norm"
    if with_t5:
        assert loaded.tokenizer_3("a red circle").input_ids == pipe.tokenizer_3("a red circle").input_ids
    else:
        assert loaded.text_encoder_3 is None
    # the same weights; float32 kernels may differ in the last bits on freshly loaded tensors
    assert abs(generate(loaded) - generate(pipe)).max() < 1e-5


# ---------------------------------------------------------------------------------------------------
# Prompt encoding


@pytest.mark.parametrize("with_t5", [True, False])
@pytest.mark.parametrize("with_negative", [True, False])
@pytest.mark.parametrize("num_images_per_prompt", [1, 2])
def test_encode_sd3_equals_diffusers_encode_prompt(pipe, pipe_no_t5, with_t5, with_negative, num_images_per_prompt):
    pipe = pipe if with_t5 else pipe_no_t5
    prompts = dict(prompt=PROMPTS, prompt_2=None, prompt_3=["a circle, red", "a square, blue"],
                   negative_prompt=["blurry", "dark"], negative_prompt_2=None, negative_prompt_3=None)  # fmt: skip
    options = dict(num_images_per_prompt=num_images_per_prompt, max_sequence_length=MAX_T5, clip_skip=None)
    positive, negative = encode_sd3(pipe, *prompts.values(), with_negative=with_negative, **options)
    expected = pipe.encode_prompt(**prompts, do_classifier_free_guidance=with_negative, **options)
    rows = 2 * num_images_per_prompt
    assert positive.prompt_embeds.shape == (rows, 77 + MAX_T5, 96) and positive.pooled_embeds.shape == (rows, 64)
    assert positive.time_ids is None and positive.attention_mask is None
    assert torch.equal(positive.prompt_embeds, expected[0]) and torch.equal(positive.pooled_embeds, expected[2])
    if with_negative:
        assert torch.equal(negative.prompt_embeds, expected[1]) and torch.equal(negative.pooled_embeds, expected[3])
        assert not torch.equal(negative.prompt_embeds, positive.prompt_embeds)
    else:
        assert negative is None
    t5_part = positive.prompt_embeds[:, 77:]
    assert (t5_part.abs().sum() > 0) == with_t5  # diffusers fills zeros without T5


def test_given_embeds_get_one_row_per_image(pipe):
    options = dict(max_sequence_length=MAX_T5)
    one, one_negative = encode_sd3(pipe, PROMPTS, negative_prompt="dark", **options)
    per_image, per_image_negative = encode_sd3(pipe, PROMPTS, negative_prompt="dark", num_images_per_prompt=2, **options)
    given, given_negative = encode_sd3(
        pipe, None, prompt_embeds=one.prompt_embeds, pooled_prompt_embeds=one.pooled_embeds,
        negative_prompt_embeds=one_negative.prompt_embeds, negative_pooled_prompt_embeds=one_negative.pooled_embeds,
        num_images_per_prompt=2, **options,
    )  # fmt: skip
    for ours, theirs in ((given, per_image), (given_negative, per_image_negative)):
        assert torch.equal(ours.prompt_embeds, theirs.prompt_embeds) and torch.equal(ours.pooled_embeds, theirs.pooled_embeds)
    # given positive embeds and a negative prompt: both end up per image
    mixed, mixed_negative = encode_sd3(
        pipe, None, negative_prompt="dark", prompt_embeds=one.prompt_embeds, pooled_prompt_embeds=one.pooled_embeds,
        num_images_per_prompt=2, **options,
    )  # fmt: skip
    assert torch.equal(mixed.prompt_embeds, per_image.prompt_embeds)
    assert torch.equal(mixed_negative.prompt_embeds, per_image_negative.prompt_embeds)


def test_encode_sd3_errors_name_the_parameter(pipe):
    embeds, _ = encode_sd3(pipe, "a", with_negative=False, max_sequence_length=MAX_T5)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        encode_sd3(pipe, None, prompt_embeds=embeds.prompt_embeds, with_negative=False, max_sequence_length=MAX_T5)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        encode_sd3(pipe, "a", negative_prompt_embeds=embeds.prompt_embeds, max_sequence_length=MAX_T5)
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_sd3(pipe, "a", max_sequence_length=513)
    with pytest.raises(TypeError, match="prompt"):
        encode_sd3(pipe, None)


# ---------------------------------------------------------------------------------------------------
# NAG negative: the official SD3 pipeline's rule


def nag_negative(pipe, batch=2, num_images_per_prompt=2, **options):
    options = {"max_sequence_length": MAX_T5, **options}
    return encode_sd3_nag_negative(pipe, batch, num_images_per_prompt, **options)


def encoded(pipe, texts, num_images_per_prompt=2, **options):
    """diffusers' positive prompt embeds of ``texts``."""
    return pipe.encode_prompt(texts, None, None, num_images_per_prompt=num_images_per_prompt,
                              do_classifier_free_guidance=False, max_sequence_length=MAX_T5, **options)[0]  # fmt: skip


def test_nag_negative_embeds_given_are_used_per_image(pipe):
    given = torch.randn(2, 77 + MAX_T5, 96)
    result = nag_negative(pipe, nag_negative_prompt_embeds=given, nag_negative_prompt="ignored", negative_prompt="ignored")
    assert torch.equal(result, given.repeat_interleave(2, dim=0))
    per_image = torch.randn(4, 77 + MAX_T5, 96)
    assert torch.equal(nag_negative(pipe, nag_negative_prompt_embeds=per_image), per_image)


def test_nag_negative_prompt_is_encoded_as_a_positive_prompt(pipe):
    result = nag_negative(pipe, nag_negative_prompt="blurry", negative_prompt="dark")  # nag_negative_prompt wins
    assert result.shape == (4, 77 + MAX_T5, 96)
    assert torch.equal(result, encoded(pipe, ["blurry", "blurry"]))
    listed = nag_negative(pipe, nag_negative_prompt=["blurry", "dark"])
    assert torch.equal(listed, encoded(pipe, ["blurry", "dark"]))
    skipped = nag_negative(pipe, nag_negative_prompt="blurry", clip_skip=1)
    assert torch.equal(skipped, encoded(pipe, ["blurry", "blurry"], clip_skip=1)) and not torch.equal(skipped, result)


def test_nag_negative_falls_back_to_the_cfg_negative(pipe):
    _, negative = encode_sd3(pipe, PROMPTS, negative_prompt="dark", num_images_per_prompt=2, max_sequence_length=MAX_T5)
    result = nag_negative(pipe, negative_prompt="dark", negative_prompt_embeds=negative.prompt_embeds)
    assert torch.equal(result, negative.prompt_embeds)
    scaled = 2 * negative.prompt_embeds  # taken as they are, not encoded again
    assert torch.equal(nag_negative(pipe, negative_prompt="dark", negative_prompt_embeds=scaled), scaled)
    # without CFG (no negative embeds) the negative prompt is encoded, its _2 / _3 texts included
    alone = nag_negative(pipe, negative_prompt="dark")
    assert torch.equal(alone, encoded(pipe, ["dark", "dark"]))
    third = nag_negative(pipe, negative_prompt="dark", negative_prompt_3="gloomy")
    assert torch.equal(third[:, :77], alone[:, :77]) and not torch.equal(third[:, 77:], alone[:, 77:])
    # CFG negative embeds without a negative prompt (the user's own) are not NAG's negative: the empty string is
    empty = nag_negative(pipe, negative_prompt_embeds=negative.prompt_embeds)
    assert torch.equal(empty, encoded(pipe, ["", ""]))


@pytest.mark.parametrize("with_t5", [True, False])
def test_nag_negative_defaults_to_the_encoded_empty_string(pipe, pipe_no_t5, with_t5):
    pipe = pipe if with_t5 else pipe_no_t5
    result = nag_negative(pipe)
    assert torch.equal(result, encoded(pipe, ["", ""]))
    assert result[:, :77].abs().sum() > 0  # real CLIP embeddings, not force-zeros
    assert (result[:, 77:].abs().sum() > 0) == with_t5


def test_nag_negative_errors_name_the_parameter(pipe):
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds has batch 3"):
        nag_negative(pipe, nag_negative_prompt_embeds=torch.randn(3, 77 + MAX_T5, 96))
    with pytest.raises(ValueError, match=r"nag_negative_prompt_embeds must be \[batch, 93, 96\]"):
        nag_negative(pipe, nag_negative_prompt_embeds=torch.randn(2, 77 + 256, 96))
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds must be"):
        nag_negative(pipe, nag_negative_prompt_embeds=torch.randn(2, 77 + MAX_T5, 64))
    with pytest.raises(ValueError, match="negative_prompt_embeds has batch 3"):
        nag_negative(pipe, negative_prompt="dark", negative_prompt_embeds=torch.randn(3, 77 + MAX_T5, 96))
    with pytest.raises(ValueError, match="nag_negative_prompt has 3 entries"):
        nag_negative(pipe, nag_negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="negative_prompt has 1 entries"):
        nag_negative(pipe, negative_prompt=["a"])
    with pytest.raises(ValueError, match="negative_prompt_3 has 3 entries"):
        nag_negative(pipe, negative_prompt="a", negative_prompt_3=["a", "b", "c"])
    with pytest.raises(TypeError, match="nag_negative_prompt"):
        nag_negative(pipe, nag_negative_prompt=5)
    with pytest.raises(ValueError, match="max_sequence_length"):
        nag_negative(pipe, max_sequence_length=0)


# ---------------------------------------------------------------------------------------------------
# Family detection


@pytest.mark.parametrize("cls", [StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline])
def test_saved_sd3_folders_are_the_sd3_family(tmp_path, cls):
    cls(**build_tiny_sd3(with_t5=False)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == cls.__name__
    assert detect_family(tmp_path) == "sd3"
    assert FAMILY_PIPELINES["sd3"] == "StableDiffusion3TPGPipeline"


@pytest.mark.parametrize("class_name, family", [
    ("StableDiffusion3InpaintPipeline", "sd3"), ("StableDiffusion3PAGPipeline", "sd3"),
    ("StableDiffusion3ControlNetPipeline", "sd3"), ("StableDiffusion3TPGPipeline", "sd3"),
    ("StableDiffusionPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
])  # fmt: skip
def test_folder_family_of_sd3_class_names(tmp_path, class_name, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert detect_family(tmp_path) == family


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_a_single_file_mmdit_is_refused_not_misdetected(tmp_path, prefix):
    path = tmp_path / "sd3_medium.safetensors"
    tensors = {
        f"{prefix}joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(2),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2),  # would read as SD 1.x
    }
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="single-file SD3 / SD3.5 .*not supported yet.*diffusers folder") as error:
        detect_family(path)
    assert "\n" not in str(error.value)


def test_a_pickled_mmdit_is_refused_too(tmp_path):
    path = tmp_path / "sd3.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="SD3 / SD3.5"):
        detect_family(path, allow_pickle=True)
