"""The embedded model's training recipe: warm start from a saved pipeline, held-out tuning prompts."""

import os

import pytest
import torch

from dualguide.toy.model import EMBEDDED_DIR, build_components, encode_tokens, load_pipeline, tokenize
from training import evaluate
from training.train_unet import warm_start

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(not os.path.isfile(os.path.join(EMBEDDED_DIR, "model_index.json")), reason="no embedded model")
def test_warm_start_matches_the_saved_model_token_by_token():
    parts = build_components(seed=0)
    warm_start(parts, str(EMBEDDED_DIR))
    saved = load_pipeline()
    texts = ["a red circle on a blue background", ""]  # words both vocabularies have

    def encode(encoders, tokenizers):
        with torch.no_grad():
            return encode_tokens(*encoders, *(tokenize(tokenizer, texts) for tokenizer in tokenizers))

    new = encode((parts["text_encoder"], parts["text_encoder_2"]), (parts["tokenizer"], parts["tokenizer_2"]))
    old = encode((saved.text_encoder, saved.text_encoder_2), (saved.tokenizer, saved.tokenizer_2))
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(parts["unet"].parameters(), saved.unet.parameters()):
        assert torch.equal(a, b.float())


def test_evaluate_chooses_settings_on_held_out_prompts_only(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--write", "--prompt-set", "evaluation"])
    assert "--write chooses recommended.json on the held-out tuning prompts only" in capsys.readouterr().err
    assert evaluate.parse_args(["--write"]).prompt_set == "tuning"


def test_nag_tuning_refuses_bad_settings_and_chooses_by_its_rule(capsys):
    from training import evaluate_nag

    with pytest.raises(SystemExit):
        evaluate_nag.main(["--nag-scale", "1", "--write"])  # before any model is loaded
    assert "--nag-scale takes scales > 1" in capsys.readouterr().err
    baseline = {"negated": 0.10, "adherence": 0.80, "shape": 0.70}
    grid = {
        (3.0, 0.5, 2.5): {"negated": 0.00, "adherence": 0.60, "shape": 0.50},  # removes the negated value, and the shape
        (1.5, 0.25, 2.5): {"negated": 0.05, "adherence": 0.78, "shape": 0.69},
        (2.0, 0.25, 2.5): {"negated": 0.04, "adherence": 0.79, "shape": 0.60},
    }
    results = {guidance: {None: baseline, **grid} for guidance in evaluate_nag.GUIDANCES}
    assert evaluate_nag.choose(results, 0.05) == (1.5, 0.25, 2.5)  # the lowest negated rate that keeps the shapes
    assert evaluate_nag.choose(results, 0.0) == (2.0, 0.25, 2.5)  # none keeps them: the highest adherence
