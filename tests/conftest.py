"""Shared fixtures: tiny SDXL-layout models built in code (no downloads)."""

import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes each op 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from dualguide import StableDiffusionXLTPGPipeline, build_tiny_sdxl  # noqa: E402

torch.set_num_threads(2)
SIZE = 32  # pixels; the tiny VAE's factor is 2, so 16x16 latents


@pytest.fixture(scope="session")
def components():
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def pipe(components):
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def sdxl_pipe(components):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def unet(components):
    return components["unet"]


def unet_snapshot(unet):
    """Processors and hook dicts of every module: equal snapshots mean the UNet is exactly as it was."""
    processors = {name: id(module.processor) for name, module in unet.named_modules() if hasattr(module, "processor")}
    hooks = {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
        for name, m in unet.named_modules()
    }
    return processors, hooks


def generate(pipeline, seed=0, **kwargs):
    """Latents from a short, small run with a seeded generator."""
    settings = dict(prompt="a red circle", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent")
    settings.update(kwargs)
    return pipeline(generator=torch.Generator().manual_seed(seed), **settings).images


def modular_pipeline(blocks, components, **init):
    """diffusers modular ``blocks`` as a pipeline (``init``: ``init_pipeline``'s keywords) with ``components``, the
    tiny models built in code (no hub), progress bars off."""
    pipeline = blocks.init_pipeline(**init)
    pipeline.update_components(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def model_folder(pipe, tmp_path_factory):
    """The tiny pipeline saved as a model folder, with a recommended.json of small, fast settings."""
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    pipe.save_pretrained(folder)
    with open(folder / "recommended.json", "w") as f:
        json.dump({"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 4.0, "tpg_scale": 2.0}, f)
    return str(folder)


@pytest.fixture
def loads(monkeypatch):
    """Calls of ``generation.models.load_model``: a check that fails must fail before any model is loaded."""
    from dualguide.generation import models

    calls = []

    def refuse(path, device="auto", dtype="auto", compile=False, allow_pickle=False, family=None):
        calls.append(SimpleNamespace(path=path, device=device, dtype=dtype, compile=compile, allow_pickle=allow_pickle))
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (as torchrun workers, OMP_NUM_THREADS=1): on two busy shared cores two
    threads wait for each other and an op takes many times longer; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP model, tokenizer and image processor saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from dualguide.toy.data import grammar_words
    from dualguide.vocab import write_tokenizer_files

    folder = tmp_path_factory.mktemp("clip")
    write_tokenizer_files(str(folder), grammar_words(), model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    layers = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    text = dict(layers, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(layers, image_size=32, patch_size=8),
                                 projection_dim=16))  # fmt: skip
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
