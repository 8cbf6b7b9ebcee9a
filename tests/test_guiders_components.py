"""The Modular Diffusers guiders in ``diffusers.ComponentsManager`` setups: a managed modular SDXL runs them with the
same latents as an unmanaged one, the manager holds them as it holds diffusers' own guiders, and every scalar
argument survives save_pretrained / from_pretrained and diffusers' ComponentSpec round trip."""

import inspect
import json

import pytest
import torch
from conftest import SIZE, modular_pipeline
from counting import rows_seen
from diffusers import ComponentsManager
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import ComponentSpec, StableDiffusionXLAutoBlocks

from dualguide.guiders import DualGuidance, NormalizedAttentionGuidance, TokenPerturbationGuidance, one_forward, with_nag_negative_prompt

PROMPT = "a red circle"
STEPS = 2
NEGATIVE = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(5))


def guider(kind):
    """A guider of ``kind`` with its terms on (NAG's negative given)."""
    if kind is TokenPerturbationGuidance:
        return TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0, seed=2)
    if kind is NormalizedAttentionGuidance:
        return NormalizedAttentionGuidance(guidance_scale=5.0, nag_scale=4.0, nag_negative_prompt_embeds=NEGATIVE)
    return DualGuidance(guidance_scale=5.0, tpg_scale=3.0, nag_scale=4.0, seed=2, nag_negative_prompt_embeds=NEGATIVE)


def build(components, manager=None, collection=None, blocks=None):
    return modular_pipeline(blocks or StableDiffusionXLAutoBlocks(), components, components_manager=manager, collection=collection)


def run(pipeline, chosen, **kwargs):
    pipeline.update_components(guider=chosen)
    return pipeline(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
                    output="latents", **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def plain(components):
    return build(components)


@pytest.fixture(scope="module")
def managed(components):
    """The same modular SDXL built with a ComponentsManager (collection "sdxl")."""
    manager = ComponentsManager()
    return manager, build(components, manager, "sdxl")


@pytest.mark.parametrize("kind", [TokenPerturbationGuidance, NormalizedAttentionGuidance, DualGuidance])
def test_managed_pipeline_equals_unmanaged(plain, managed, unet, kind):
    manager, pipeline = managed
    expected = run(plain, guider(kind))
    with rows_seen(unet) as rows:
        latents = run(pipeline, guider(kind))
    assert torch.equal(latents, expected)
    assert len(rows) == STEPS * (2 + (kind is not NormalizedAttentionGuidance))  # the guider's branches ran
    assert (latents - run(plain, ClassifierFreeGuidance(guidance_scale=5.0))).abs().max() > 1e-2
    assert manager.get_one(name="unet", collection="sdxl") is unet  # the manager holds the pipeline's components


@pytest.mark.parametrize("kind", [TokenPerturbationGuidance, NormalizedAttentionGuidance, DualGuidance])
def test_manager_holds_guiders_as_diffusers_guiders(managed, kind):
    """update_components registers a guider in the manager exactly when diffusers' own guider would be (a guider is a
    from_config component: it is not); added by hand, it is found by name and collection, and shows in the summary."""
    manager, pipeline = managed
    names = {}
    for chosen in (ClassifierFreeGuidance(guidance_scale=5.0), guider(kind)):
        pipeline.update_components(guider=chosen)
        assert pipeline.guider is chosen and pipeline.get_component_spec("guider").default_creation_method == "from_config"
        names[type(chosen)] = sorted(manager._id_to_name(i) for i in manager.components)
    assert names[kind] == names[ClassifierFreeGuidance] and "guider" not in names[kind]
    for chosen in (ClassifierFreeGuidance(guidance_scale=5.0), guider(kind)):
        added = manager.add("guider", chosen, collection="guiders")
        assert manager.get_one(name="guider", collection="guiders") is chosen
        assert type(chosen).__name__ in repr(manager)
        manager.remove(added)
    assert "guiders" not in manager.collections or not manager.collections["guiders"]


def test_managed_one_forward_and_text_step(components, unet):
    """one_forward and the nag_negative_prompt step on a managed pipeline keep its manager; two pipelines built from
    the manager's components share one guider, and the negative the first sets is the one the second runs with."""
    manager = ComponentsManager()
    texted = build(components, manager, "sdxl", with_nag_negative_prompt(StableDiffusionXLAutoBlocks()))
    packed = one_forward(texted)
    assert packed._components_manager is manager and packed.unet is unet
    shared = NormalizedAttentionGuidance(guidance_scale=5.0, nag_scale=4.0)
    per_branch = run(texted, shared, nag_negative_prompt="blurry")
    negative = shared.nag_negative_prompt_embeds
    with rows_seen(unet) as rows:
        one_call = run(packed, shared)  # no text: the shared guider's negative from the run before
    assert rows == [2] * STEPS and (one_call - per_branch).abs().max() <= 1e-4
    assert shared.nag_negative_prompt_embeds is negative
    other = build(manager.get_components_by_names(["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"],
                                                  collection="sdxl"))  # fmt: skip
    assert other.unet is unet and torch.equal(run(other, shared), per_branch)


TPG = dict(guidance_scale=4.5, tpg_scale=2.5, tpg_layers="d2-d5", tpg_start=0.1, tpg_stop=0.9, guidance_rescale=0.3, seed=[7, 8],
           start=0.2, stop=0.8, enabled=False)  # fmt: skip
NAG = dict(nag_scale=2.5, nag_tau=1.5, nag_alpha=0.75, nag_use_l1=False, nag_start=0.3, nag_stop=0.6)
SETTINGS = {
    TokenPerturbationGuidance: TPG,
    NormalizedAttentionGuidance: {**NAG, **{k: TPG[k] for k in ("guidance_scale", "guidance_rescale", "start", "stop", "enabled")}},
    DualGuidance: {**TPG, **NAG},
}


def scalar_arguments(kind) -> set:
    return set(inspect.signature(kind.__init__).parameters) - {"self", "nag_negative_prompt_embeds"}


def test_dual_guidance_save_round_trip(tmp_path):
    """Every scalar argument of DualGuidance through save_pretrained / from_pretrained (tests/test_guiders.py does
    TokenPerturbationGuidance's and NormalizedAttentionGuidance's), its NAG part with them."""
    kind = DualGuidance
    settings = SETTINGS[kind]
    assert set(settings) == scalar_arguments(kind)
    kind(**settings, nag_negative_prompt_embeds=NEGATIVE).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "guider_config.json").read_text())
    assert {name: saved[name] for name in settings} == settings and "nag_negative_prompt_embeds" not in saved
    loaded = kind.from_pretrained(tmp_path, nag_negative_prompt_embeds=NEGATIVE)
    assert {name: loaded.config[name] for name in settings} == settings and loaded.nag_negative_prompt_embeds is NEGATIVE
    part = loaded.nag_guidance
    assert {name: getattr(part, name) for name in NAG} == NAG and part._enabled is False


@pytest.mark.parametrize("kind", [TokenPerturbationGuidance, NormalizedAttentionGuidance, DualGuidance])
def test_component_spec_round_trip(plain, kind):
    """diffusers' ComponentSpec of the pipeline's guider (what the manager and from_config pipelines rebuild it from)
    recreates every scalar argument; NAG's negative, runtime and not config, is given again to ``create``."""
    settings = SETTINGS[kind]
    assert set(settings) == scalar_arguments(kind)
    runtime = {} if kind is TokenPerturbationGuidance else {"nag_negative_prompt_embeds": NEGATIVE}
    plain.update_components(guider=kind(**settings, **runtime))
    spec = plain.get_component_spec("guider")
    assert spec.type_hint is kind and "nag_negative_prompt_embeds" not in spec.config
    created = spec.create(**runtime)
    assert type(created) is kind and {name: created.config[name] for name in settings} == settings
    assert getattr(created, "nag_negative_prompt_embeds", None) is runtime.get("nag_negative_prompt_embeds")
    assert ComponentSpec.from_component("guider", created).config == spec.config
