"""TPG and NAG as Modular Diffusers guiders on SDXL, per branch and in one UNet call per step.

    python examples/modular_guiders.py                       # tiny random SDXL layout, no download
    python examples/modular_guiders.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --size 1024

diffusers' modular SDXL takes a guider component; ``TokenPerturbationGuidance`` and ``NormalizedAttentionGuidance``
plug in there (``update_components(guider=...)``) and diffusers' loop runs one UNet call per branch.
``dualguide.guiders.one_forward(pipe)`` gives the same pipeline running all of a step's branches in one call. NAG's
negative is prompt embeds, made here by the pipeline's own text-encoder block. The grid shows CFG, CFG + TPG and
CFG + NAG from one seed; the script prints how far the one-call run is from the per-branch one.
"""

import argparse

import torch
from diffusers.guiders import ClassifierFreeGuidance

from dualguide.generation.images import labelled_grid
from dualguide.guiders import NormalizedAttentionGuidance, TokenPerturbationGuidance, one_forward
from dualguide.loading import default_dtype


def load(model, device: str):
    """The modular SDXL pipeline: the tiny layout built in code, or ``model``'s components."""
    from diffusers.modular_pipelines import ModularPipeline, StableDiffusionXLAutoBlocks

    if model is None:
        from dualguide.tiny import build_tiny_sdxl

        pipe = StableDiffusionXLAutoBlocks().init_pipeline()
        pipe.update_components(**build_tiny_sdxl(seed=0))
    else:
        pipe = ModularPipeline.from_pretrained(model)
        pipe.load_components(torch_dtype=default_dtype(device))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nag_negative(pipe, text: str) -> torch.Tensor:
    """The prompt embeds of ``text``, by the pipeline's own text-encoder block (one condition: no negative made)."""
    encoder = pipe.blocks.sub_blocks["text_encoder"].init_pipeline()
    parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    encoder.update_components(**{name: getattr(pipe, name) for name in parts}, guider=ClassifierFreeGuidance(guidance_scale=1.0))
    return encoder(prompt=text, output="prompt_embeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an SDXL hub id or diffusers folder (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--out", default="modular_guiders.png")
    args = parser.parse_args()

    pipe = load(args.model, args.device)
    packed = one_forward(pipe)  # the same components; every branch of the guider in one UNet call per step
    guiders = {
        "CFG": ClassifierFreeGuidance(guidance_scale=5.0),
        "CFG + TPG": TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0),
        "CFG + NAG": NormalizedAttentionGuidance(guidance_scale=5.0, nag_scale=3.0, nag_negative_prompt_embeds=nag_negative(pipe, "blurry, low quality")),
    }
    common = dict(prompt="a red fox in the snow", num_inference_steps=args.steps, height=args.size, width=args.size)
    images = []
    for name, guider in guiders.items():
        pipe.update_components(guider=guider)
        per_branch = pipe(**common, generator=torch.Generator(args.device).manual_seed(0), output="latents")
        packed.update_components(guider=guider)
        one_call = packed(**common, generator=torch.Generator(args.device).manual_seed(0), output=["latents", "images"])
        difference = (one_call["latents"].float() - per_branch.float()).abs().max()
        print(f"{name}: one call vs per branch, max |latent difference| {difference:.2e}")
        images.append(one_call["images"][0])
    labelled_grid(list(guiders), [images]).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
