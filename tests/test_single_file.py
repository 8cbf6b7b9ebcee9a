"""The command on a single-file SD 1.x checkpoint (original LDM key layout), offline: diffusers reads the weights
from the file and the component configs from the local Hugging Face cache's copy of its default SD 1.x repo, as on
a user's machine that has downloaded that repo's config files once."""

import json
import os
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from dualguide import StableDiffusionTPGPipeline, cli
from dualguide.tiny import build_tiny_sd

from ldm_checkpoint import ldm_state_dict

# The repo diffusers' from_single_file takes an SD 1.x checkpoint's configs from (DIFFUSERS_DEFAULT_PIPELINE_PATHS["v1"]).
SD1_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # what from_single_file fetches of the repo: configs and tokenizer files
ARGS = ["--steps", "2", "--size", "32", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SD 1.x pipeline saved both ways: a diffusers folder and an original-layout tiny_sd.safetensors."""
    root = tmp_path_factory.mktemp("single_file")
    pipe = StableDiffusionTPGPipeline(**build_tiny_sd(version=1))
    pipe.save_pretrained(root / "folder")
    save_file(ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder), str(root / "tiny_sd.safetensors"))
    return pipe, root / "folder", root / "tiny_sd.safetensors"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache for this test (offline, as everywhere in the tests); returns its folder."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo_configs(cache, repo, folder):
    """``folder``'s config and tokenizer files as the cached snapshot of ``repo`` (what
    ``hf download <repo> --include "*.json" "*.txt"`` leaves in the cache)."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    for path in folder.rglob("*"):
        if path.is_file() and path.name.endswith(CONFIG_SUFFIXES):
            target = storage / "snapshots" / COMMIT / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    index = storage / "snapshots" / COMMIT / "model_index.json"  # the hub repo's pipeline class, not the guided one
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionPipeline"}))


def test_the_ldm_checkpoint_loads_back_weight_for_weight_in_diffusers(tiny):
    pipe, folder, checkpoint = tiny
    loaded = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name


def run(model, out):
    assert cli.main(["generate", "a red circle", "--model", str(model), *ARGS, "--out", str(out)]) == 0
    (name,) = os.listdir(out)
    image = Image.open(out / name)
    return np.asarray(image.convert("RGB"), dtype=np.int16), image.text


def test_generate_on_a_single_file_checkpoint_takes_the_configs_from_the_local_hub_cache(tiny, hub_cache, tmp_path):
    _, folder, checkpoint = tiny
    cache_repo_configs(hub_cache, SD1_REPO, folder)
    pixels, text = run(checkpoint, tmp_path / "single")
    assert json.loads(text["parameters"])["tpg_applied_layers_index"] == "d4-d5"
    expected, _ = run(folder, tmp_path / "folder")
    assert pixels.shape == (32, 32, 3) and np.abs(pixels - expected).max() <= 1


def test_a_single_file_checkpoint_without_cached_configs_offline_fails_in_one_line(tiny, hub_cache, tmp_path, capsys):
    _, _, checkpoint = tiny
    assert cli.main(["generate", "a red circle", "--model", str(checkpoint), *ARGS, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"hf download {SD1_REPO} --include" in err and "not in the local Hugging Face cache" in err
