"""The embedded model's caption grammar: partial prompts, attribute-dropout training captions, held-out prompts,
negative-prompt pairs. numpy only, no model."""

import argparse

import numpy as np
import pytest

from dualguide.toy.data import (
    COLORS, OPEN_ATTRIBUTES, SHAPES, caption, drop_attributes, evaluation_prompts, grammar_words, negated_labels,
    negative_prompts, parse_prompt, random_labels, training_caption, tuning_negative_prompts, tuning_prompts,
)  # fmt: skip
from training.train_unet import dropout_rates, parse_args, step_captions

FULL = {"shape": "star", "color": "red", "background": "blue", "size": "small", "position": "left"}


@pytest.mark.parametrize(
    "labels, text",
    [
        (FULL, "a small red star on the left on a blue background"),
        ({**FULL, "color": ""}, "a small star on the left on a blue background"),
        ({**FULL, "shape": ""}, "a small red shape on the left on a blue background"),
        ({**FULL, "background": "", "size": "medium", "position": ""}, "a red star"),
        ({**FULL, "color": "orange", "shape": "", "background": "", "size": "medium"}, "an orange shape on the left"),
        ({"shape": "", "color": "", "background": "", "size": "medium", "position": ""}, "a shape"),
    ],
)
def test_partial_captions_parse_back(labels, text):
    assert caption(labels) == text
    assert parse_prompt(text) == labels


@pytest.mark.parametrize("text", ["a small red", "a red blob on a blue background", "a red star on a pink background",
                                  "red", "a red star on the moon"])  # fmt: skip
def test_prompts_outside_the_grammar_are_refused(text):
    with pytest.raises(ValueError, match="not in the toy grammar"):
        parse_prompt(text)


def test_shape_is_one_word_of_the_vocabulary():
    assert "shape" in grammar_words() and not set(SHAPES) & {"shape"}


def test_dropout_rates_and_what_an_open_attribute_keeps():
    rng = np.random.default_rng(0)
    dropped = [drop_attributes(FULL, rng, 0.25) for _ in range(4000)]
    for name, open_value in [("color", ""), ("shape", ""), ("background", ""), ("size", "medium"), ("position", "")]:
        share = np.mean([labels[name] == open_value for labels in dropped])
        assert 0.22 < share < 0.28, (name, share)
        assert {labels[name] for labels in dropped} == {open_value, FULL[name]}  # open or true, never another value
    assert all(d == FULL for d in (drop_attributes(FULL, rng, 0.0) for _ in range(50)))


def test_per_attribute_dropout_rates():
    rates = dropout_rates("0.25,shape=0.1,size=0")
    assert rates == {"color": 0.25, "shape": 0.1, "background": 0.25, "size": 0.0, "position": 0.25}
    assert dropout_rates("0.3") == 0.3
    with pytest.raises(argparse.ArgumentTypeError, match="unknown attribute 'colour'; valid: color, shape"):
        dropout_rates("0.25,colour=0.1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"shape rate must be a finite number in \[0, 1\], got -0.1"):
        dropout_rates("0.25,shape=-0.1")
    rng = np.random.default_rng(0)
    dropped = [drop_attributes(FULL, rng, rates) for _ in range(4000)]
    assert 0.08 < np.mean([labels["shape"] == "" for labels in dropped]) < 0.12
    assert 0.22 < np.mean([labels["color"] == "" for labels in dropped]) < 0.28
    assert all(labels["size"] == "small" for labels in dropped)
    uniform, mapped = np.random.default_rng(5), np.random.default_rng(5)  # one rate == the same rate for every name
    assert [drop_attributes(FULL, uniform, 0.25) for _ in range(50)] == [
        drop_attributes(FULL, mapped, dropout_rates("0.25,shape=0.25")) for _ in range(50)
    ]


def test_default_caption_dropout_is_the_documented_one():
    """The default of --caption-dropout is the rate list its help (and training/README.md) names."""
    assert parse_args([]).caption_dropout == dropout_rates("0.2,shape=0.1,size=0.1,position=0.1")


def test_training_captions_are_true_of_the_image_and_sometimes_empty():
    rng = np.random.default_rng(1)
    scenes = [random_labels(rng) for _ in range(2000)]
    captions = [training_caption(labels, rng) for labels in scenes]
    assert 0.08 < np.mean([text == "" for text in captions]) < 0.12
    partial = 0
    for labels, text in zip(scenes, captions):
        if text:
            named = parse_prompt(text)
            assert all(named[k] in ("", labels[k]) for k in OPEN_ATTRIBUTES)
            partial += any(named[k] == "" for k in OPEN_ATTRIBUTES)
    assert 0.33 < partial / len(captions) < 0.43  # 0.9 x (1 - 0.8 x 0.9 x 0.8) = 0.38 leave colour, shape or background open


def test_a_caption_dropout_outside_0_1_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--caption-dropout", "1.5"])
    assert "argument --caption-dropout: rate must be a finite number in [0, 1], got 1.5" in capsys.readouterr().err


def test_step_captions_depend_on_seed_and_step_only():
    labels = [random_labels(np.random.default_rng(n)) for n in range(64)]
    args = argparse.Namespace(seed=3, caption_dropout=0.25, empty_rate=0.1)
    first = step_captions(labels, args, step=5)
    assert first == step_captions(labels, args, step=5)  # a resumed run draws the same captions
    assert first != step_captions(labels, args, step=6)
    assert step_captions(labels, argparse.Namespace(seed=3, caption_dropout=0.0, empty_rate=0.0), 5) == [
        caption(label) for label in labels
    ]


def test_tuning_prompts_are_held_out_from_the_evaluation_prompts():
    tuning = tuning_prompts(32)
    assert len(set(tuning)) == 32 and not set(tuning) & set(evaluation_prompts(1024))
    assert evaluation_prompts(2) == ["a white circle on the left on a black background",
                                     "a large purple square on a blue background"]  # fmt: skip


def test_tuning_negative_prompts_are_held_out_from_the_evaluated_ones():
    tuning = tuning_negative_prompts(48)
    held_out = {prompt for prompt, _ in negative_prompts(1024)}  # dualguide eval --negative-prompts N <= 1024
    assert len({prompt for prompt, _ in tuning}) == 48 and not {prompt for prompt, _ in tuning} & held_out
    assert [negated_labels(negative)[0] for _, negative in tuning[:3]] == list(OPEN_ATTRIBUTES)
    assert negative_prompts(4) == negative_prompts(4, exclude=[])  # what eval measures is unchanged


def test_negative_prompts_leave_open_what_the_negative_names():
    pairs = negative_prompts(60, seed=2)
    assert len({prompt for prompt, _ in pairs}) == 60
    attributes = []
    for prompt, negative in pairs:
        wanted, (attribute, value) = parse_prompt(prompt), negated_labels(negative)
        attributes.append(attribute)
        assert wanted[attribute] == ""  # open in the prompt
        assert [k for k in OPEN_ATTRIBUTES if not wanted[k]] == [attribute]  # the others are named
        assert value not in (wanted["color"], wanted["background"])  # a colour the scene could show
    assert attributes[:3] == list(OPEN_ATTRIBUTES) and attributes.count("shape") == 20


@pytest.mark.parametrize(
    "negative, expected",
    [("red", ("color", "red")), ("a red shape", ("color", "red")), ("circle", ("shape", "circle")),
     ("a circle", ("shape", "circle")), ("a shape on a green background", ("background", "green")),
     (" Blue ", ("color", "blue"))],
)  # fmt: skip
def test_negated_labels(negative, expected):
    assert negated_labels(negative) == expected


@pytest.mark.parametrize("negative", ["a red circle", "blurry", "a shape", ""])
def test_negated_labels_need_one_value(negative):
    with pytest.raises(ValueError, match="one colour, shape or background"):
        negated_labels(negative)


def test_colors_and_shapes_are_distinct_words():
    assert not set(COLORS) & set(SHAPES)
