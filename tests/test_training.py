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
