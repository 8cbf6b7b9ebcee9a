"""Train the toy SDXL-layout UNet and both text encoders on cached VAE latents of procedural shape images.

    python -m training.train_unet --caption-dropout 0 --export outputs/training/embedded_v1   # v1, ~62 min on 2 cores
    python -m training.train_unet --init FOLDER --lr 1e-4 --steps 560 ...   # a fine-tune (training/README.md)

Latents (from the VAE of ``training.train_vae``) and the images' labels are computed once and cached in
``OUT/cache.pt``; each step captions its images anew, dropping each attribute at ``--caption-dropout`` and
leaving ``--empty-rate`` of them empty, so partial prompts ("a circle on a blue background") are in
distribution and an open attribute means "any". The text encoders are trained with the UNet so that every
caption word, the background colour included, gets a meaning. v-prediction, loss weight ``min(1, gamma/SNR)``,
offset noise, EMA.
Every ``--sample-every`` steps a grid of fixed grammar prompts under no guidance / CFG / CFG+TPG goes
to ``OUT/samples`` (with judged adherence in ``OUT/log.jsonl`` when a judge exists). At the end the EMA
weights are written with ``--export`` as a diffusers folder (UNet stored in float16, under 30 MB) plus
``recommended.json``. All randomness of a step comes from (seed, step): ``--resume`` continues the run.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from dualguide.toy.data import (
    CAPTION_DROPOUT, DROPPABLE, EMPTY_CAPTION_RATE, DropoutRates, evaluation_prompts, grammar_words, sample,
    training_caption,
)
from dualguide.toy.model import (
    RESOLUTION, assemble_pipeline, build_components, encode_images, encode_tokens, pixels, save_pipeline, time_ids,
    tokenize,
)  # fmt: skip

from samplers.checks import check_number

from . import common

MAX_WEIGHTS_BYTES = 30_000_000
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TRAINED = ("unet",) + TEXT_ENCODERS
T = TypeVar("T")
GRID_SEED = 7
GRID_COLUMNS: Dict[str, dict] = {
    "none": {"guidance_scale": 1.0, "tpg_scale": 0.0},
    "cfg": {"guidance_scale": 5.0, "tpg_scale": 0.0},
    "cfg+tpg": {"guidance_scale": 5.0, "tpg_scale": 3.0},
}
RECOMMENDED = {
    "num_inference_steps": 25, "guidance_scale": 5.0, "tpg_scale": 3.0, "tpg_applied_layers_index": "d6-d23",
    "height": RESOLUTION, "width": RESOLUTION, "sampler": "euler", "sigma_schedule": "model",
}  # fmt: skip


@torch.no_grad()
def build_cache(vae, tokenizers, count: int, seed: int, chunk: int = 1024) -> dict:
    """``count`` procedural samples from ``seed`` as float16 normalised latents and their labels."""
    rng = np.random.default_rng(seed)
    latents, labels = [], []
    for start in range(0, count, chunk):
        items = [sample(rng, RESOLUTION) for _ in range(min(chunk, count - start))]
        latents.append(encode_images(vae, pixels(np.stack([item[0] for item in items]))).half())
        labels += [item[2] for item in items]
        print(f"cached {start + len(items)}/{count} latents", flush=True)
    return {"latents": torch.cat(latents), "labels": labels, "key": cache_key(vae, tokenizers, count, seed)}


def cache_key(vae, tokenizers, count: int, seed: int) -> dict:
    """What a cache depends on: data count and seed, the VAE's latent statistics, the tokenizers' ids of the grammar."""
    probe = [tokenize(tokenizer, grammar_words()).tolist() for tokenizer in tokenizers]
    return {"count": count, "seed": seed, "content": "labels", "latents_mean": list(vae.config.latents_mean or []),
            "latents_std": list(vae.config.latents_std or []), "probe": probe}  # fmt: skip


def load_or_build_cache(path: Path, vae, tokenizers, count: int, seed: int) -> dict:
    """The cache at ``path`` if built from the same VAE, tokenizers, count and seed; else a new one, saved there."""
    if path.exists():
        cache = torch.load(path, weights_only=False)
        if cache["key"] == cache_key(vae, tokenizers, count, seed):
            return cache
    cache = build_cache(vae, tokenizers, count, seed)
    torch.save(cache, path)
    return cache


def snr_clamp_weight(alphas: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss weights ``min(1, gamma / SNR)`` (``alphas`` are ``alphas_cumprod[t]``; gamma 0: all 1).

    For eps targets this is min-SNR-gamma (Hang et al. 2023). For v targets it only damps the low-noise
    end and keeps full weight at high noise, where the layout and the background colour are decided
    (the paper's v form, ``min(SNR, gamma) / (SNR + 1)``, would weight t=999 by about 0.005).
    """
    if gamma <= 0:
        return torch.ones_like(alphas)
    return (gamma * (1 - alphas) / alphas).clamp(max=1.0)


def step_captions(labels: List[dict], args: argparse.Namespace, step: int) -> List[str]:
    """Captions of one step's images: attributes dropped at ``--caption-dropout``, ``--empty-rate`` empty."""
    rng = common.step_rng(args.seed, step, stream=2)
    return [training_caption(label, rng, args.caption_dropout, args.empty_rate) for label in labels]


def diffusion_batch(
    cache: dict, tokenizers: tuple, alphas_cumprod: torch.Tensor, args: argparse.Namespace, step: int
) -> dict:
    """Noisy latents, timesteps, targets, loss weights and token ids of one step, all drawn from (seed, step)."""
    generator = common.step_generator(args.seed, step, stream=1)
    index = torch.randint(len(cache["latents"]), (args.batch,), generator=generator)
    captions = step_captions([cache["labels"][i] for i in index.tolist()], args, step)
    ids, ids_2 = (tokenize(tokenizer, captions) for tokenizer in tokenizers)
    x0 = cache["latents"][index].float()
    noise = torch.randn(x0.shape, generator=generator)
    noise = noise + args.offset_noise * torch.randn(x0.shape[:2] + (1, 1), generator=generator)
    t = torch.randint(len(alphas_cumprod), (args.batch,), generator=generator)
    alphas = alphas_cumprod[t]
    a, s = alphas.sqrt().view(-1, 1, 1, 1), (1 - alphas).sqrt().view(-1, 1, 1, 1)
    target = a * noise - s * x0 if args.prediction_type == "v_prediction" else noise
    return {"noisy": a * x0 + s * noise, "t": t, "target": target, "weight": snr_clamp_weight(alphas, args.snr_gamma),
            "ids": ids, "ids_2": ids_2}  # fmt: skip


def diffusion_loss(parts: dict, batch: dict, train_text: bool) -> torch.Tensor:
    """Weighted MSE of the UNet's prediction, text encoded exactly as the SDXL pipeline encodes it."""
    with torch.set_grad_enabled(train_text):
        embeds, pooled = encode_tokens(parts["text_encoder"], parts["text_encoder_2"], batch["ids"], batch["ids_2"])
    added = {"text_embeds": pooled, "time_ids": time_ids(len(pooled))}
    prediction = parts["unet"](batch["noisy"], batch["t"], embeds, added_cond_kwargs=added).sample
    per_sample = F.mse_loss(prediction, batch["target"], reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * batch["weight"]).mean()


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, constant, then linear decay to 0 over the last ``--decay`` fraction of ``--steps``."""
    decay_start = args.steps * (1 - args.decay)
    decay = 1.0 if step < decay_start else max(0.0, (args.steps - step) / max(1.0, args.steps - decay_start))
    return common.warmup_factor(step, args.warmup) * decay


def load_judge(folder: Optional[str]):
    """The judge in ``folder``, or None when there is none (adherence is then not logged)."""
    if not folder or not (Path(folder) / "model.safetensors").exists():
        return None
    from dualguide.toy.judge import ShapeJudge

    return ShapeJudge.load(folder)


@torch.no_grad()
def sample_grid(pipe, path: Path, prompts: List[str], steps: int, judge) -> dict:
    """Save a prompts x GRID_COLUMNS grid (one seed) to ``path``; returns judged adherence per column (with a judge)."""
    from dualguide.toy.judge import adherence

    columns, report = [], {}
    for name, settings in GRID_COLUMNS.items():
        generator = torch.Generator().manual_seed(GRID_SEED)
        size = {"height": RESOLUTION, "width": RESOLUTION}
        images = pipe(prompts, num_inference_steps=steps, generator=generator, **size, **settings).images
        columns.append(common.as_arrays(images))
        if judge is not None:
            result = adherence(images, prompts, judge)
            report[name] = {"adherence": result.adherence, "background": result.background}
    common.image_grid([list(row) for row in zip(*columns)], prompts, list(GRID_COLUMNS)).save(path)
    return report


def export(parts: dict, folder: Path, recommended: dict) -> int:
    """Write the pipeline (UNet stored in float16) and ``recommended.json`` to ``folder``; returns the weights' size."""
    save_pipeline(assemble_pipeline({**parts, "unet": copy.deepcopy(parts["unet"]).half()}), folder, recommended)
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    if size > MAX_WEIGHTS_BYTES:
        raise RuntimeError(f"weights in {folder} take {size / 1e6:.1f} MB, over {MAX_WEIGHTS_BYTES / 1e6:.0f} MB")
    return size


def dropout_rates(text: str) -> DropoutRates:
    """``--caption-dropout``: "0.25" (every attribute) or "0.25,shape=0.1" (a default rate, then overrides), each
    rate in [0, 1]."""
    default, *overrides = text.split(",")
    try:
        default_rate = check_number(float(default), "rate", 0.0, 1.0)
        if not overrides:
            return default_rate
        rates = dict.fromkeys(DROPPABLE, default_rate)
        for item in overrides:
            name, _, value = item.partition("=")
            if name not in DROPPABLE:
                raise ValueError(f"unknown attribute {name!r}; valid: {', '.join(DROPPABLE)}")
            rates[name] = check_number(float(value), f"{name} rate", 0.0, 1.0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return rates


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = common.parser(__doc__.splitlines()[0], out="outputs/training/unet", steps=1400, batch=128, lr=5e-4, minutes=68)
    p.add_argument("--vae", default="outputs/training/vae/vae", help="trained VAE folder (from training.train_vae)")
    p.add_argument("--images", type=int, default=20000, help="procedural images whose latents are cached")
    p.add_argument("--caption-dropout", type=dropout_rates, default=CAPTION_DROPOUT,
                   help="rate at which a caption leaves out each of colour, shape, background, size and position: "
                   "one number, or one then NAME=RATE overrides (default: 0.2,shape=0.1,size=0.1,position=0.1)")
    p.add_argument("--empty-rate", type=float, default=EMPTY_CAPTION_RATE, help="share of empty captions (for CFG)")
    p.add_argument("--prediction-type", choices=("v_prediction", "epsilon"), default="v_prediction")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="loss weight min(1, gamma/SNR) (0: off)")
    p.add_argument("--offset-noise", type=float, default=0.1, help="std of a per-channel constant added to the noise")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay")
    p.add_argument("--decay", type=float, default=0.2, help="final fraction of --steps with a falling lr")
    p.add_argument("--text-lr", type=float, default=None, help="text encoders' learning rate (default: --lr)")
    p.add_argument("--freeze-text-encoders", action="store_true")
    p.add_argument("--init", default=None, help="start from the UNet and text encoders of this saved toy pipeline "
                   "(fine-tuning; the token embeddings are matched by token)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps of the sample grids")
    p.add_argument("--sample-prompts", type=int, default=16)
    p.add_argument("--judge", default="dualguide/embedded/judge", help="judge folder, for adherence in the log")
    p.add_argument("--export", default=None, help="folder for the final EMA pipeline (e.g. dualguide/embedded)")
    p.add_argument("--recommended", default="{}", help="JSON overriding entries of recommended.json")
    p.set_defaults(sample_every=250)
    return p.parse_args(argv)


def warm_start(parts: dict, folder: str) -> None:
    """Load the UNet and both text encoders of the toy pipeline saved in ``folder`` into ``parts``; token embeddings
    are copied by token string (a word the old vocabulary lacks keeps its fresh random row)."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    parts["unet"].load_state_dict(unet.state_dict())
    for name, model_class in zip(TEXT_ENCODERS, (CLIPTextModel, CLIPTextModelWithProjection)):
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        state = model_class.from_pretrained(folder, subfolder=name, local_files_only=True).state_dict()
        old_ids = AutoTokenizer.from_pretrained(folder, subfolder=tokenizer_name, local_files_only=True).get_vocab()
        key = next(key for key in state if key.endswith("token_embedding.weight"))
        table = parts[name].get_input_embeddings().weight.detach().clone()
        for token, index in parts[tokenizer_name].get_vocab().items():
            if token in old_ids:
                table[index] = state[key][old_ids[token]]
        parts[name].load_state_dict({**state, key: table})


def setup_training(args: argparse.Namespace) -> Tuple[dict, list, torch.optim.Optimizer, common.EMA]:
    """Components (the trained VAE, frozen, inside; ``--init`` weights), trainable parameters, optimizer and EMA."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).eval().requires_grad_(False)
    parts = build_components(args.seed, args.prediction_type, vae=vae)
    if args.init:
        warm_start(parts, args.init)
    train_text = not args.freeze_text_encoders
    groups = [{"params": list(parts["unet"].parameters()), "lr": args.lr}]
    for name in TEXT_ENCODERS:
        parts[name].requires_grad_(train_text)
    if train_text:
        text = [p for name in TEXT_ENCODERS for p in parts[name].parameters()]
        groups.append({"params": text, "lr": args.text_lr or args.lr})
    for group in groups:
        group["base_lr"] = group["lr"]
    params = [p for group in groups for p in group["params"]]
    return parts, params, torch.optim.AdamW(groups, weight_decay=0.01), common.EMA(params, args.ema)


def with_ema(ema: common.EMA, parts: dict, action: Callable[[], T]) -> T:
    """Run ``action()`` with the EMA weights in the modules (eval mode), then put the live weights back."""
    ema.swap()
    try:
        for name in TRAINED:
            parts[name].eval()
        return action()
    finally:
        ema.swap()
        for name in TRAINED:
            parts[name].train()


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    budget = common.Budget(args.time_budget)  # counts the cache and the sample grids too
    out = common.setup(args)
    parts, params, optimizer, ema = setup_training(args)
    modules = {name: parts[name] for name in TRAINED}
    step = 0
    if args.resume:
        step, state = common.resume(out, modules, optimizer)
        if state:
            ema.load_state_dict(state["ema"])
    tokenizers = (parts["tokenizer"], parts["tokenizer_2"])
    cache = load_or_build_cache(out / "cache.pt", parts["vae"], tokenizers, args.images, args.seed)
    pipe = assemble_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(args.judge)
    prompts = evaluation_prompts(args.sample_prompts)

    def grid() -> dict:
        return with_ema(ema, parts, lambda: sample_grid(pipe, out / "samples" / f"unet_{step:06d}.png", prompts,
                                                        args.sample_steps, judge))  # fmt: skip

    alphas_cumprod = parts["scheduler"].alphas_cumprod.float()
    for module in modules.values():
        module.train()
    start_step, last_log = step, budget.elapsed()
    while step < args.steps and not budget.spent():
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, args)
        batch = diffusion_batch(cache, tokenizers, alphas_cumprod, args, step)
        loss = diffusion_loss(parts, batch, not args.freeze_text_encoders)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        step += 1
        if step % 10 == 0:
            now = budget.elapsed()
            rate = round((step - max(start_step, step - 10)) * args.batch / max(now - last_log, 1e-9), 1)
            common.log(out, {"step": step, "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"],
                             "samples_per_s": rate, "seconds": round(now, 1)})  # fmt: skip
            last_log = now
        if step % args.checkpoint_every == 0:
            common.save_checkpoint(out, common.training_state(step, modules, optimizer, ema=ema.state_dict()))
        if args.sample_every and step % args.sample_every == 0:
            common.log(out, {"step": step, "judged": grid()})
            last_log = budget.elapsed()
    if step > start_step:
        common.save_checkpoint(out, common.training_state(step, modules, optimizer, ema=ema.state_dict()))
    record = {"step": step, "done": step >= args.steps, "judged": grid()}
    if args.export:
        recommended = {**RECOMMENDED, **json.loads(args.recommended)}
        record["exported_bytes"] = with_ema(ema, parts, lambda: export(parts, Path(args.export), recommended))
        record["export"] = args.export
    common.log(out, {**record, "seconds": round(budget.elapsed(), 1)})


if __name__ == "__main__":
    main()
