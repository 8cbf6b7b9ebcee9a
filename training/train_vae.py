"""Train the toy ``AutoencoderKL`` (f=4: 64x64 RGB <-> 16x16x4 latents) on procedural shape images.

    python -m training.train_vae            # about 10 minutes on 2 CPU cores

Writes ``OUT/vae`` (diffusers format; per-channel ``latents_mean`` / ``latents_std`` in its config),
``OUT/checkpoint.pt`` every ``--checkpoint-every`` steps, ``OUT/log.jsonl`` and reconstruction grids in
``OUT/samples``. Images are drawn per step from (seed, step), so ``--resume`` continues the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dualguide.toy.data import make_dataset, sample
from dualguide.toy.model import RESOLUTION, build_vae, pixels

from . import common

HELD_OUT_SEED = 10_000  # data seed of the latent statistics and the reconstruction grids


def batch_images(seed: int, step: int, batch: int) -> torch.Tensor:
    """Training images of one step in [-1, 1], ``[batch, 3, 64, 64]``."""
    rng = common.step_rng(seed, step)
    return pixels(np.stack([sample(rng, RESOLUTION)[0] for _ in range(batch)]))


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> Tuple[torch.Tensor, float]:
    """L1 + MSE reconstruction of a posterior sample plus ``kl_weight`` x KL; returns ``(loss, mse)``."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    mse = F.mse_loss(recon, images)
    return F.l1_loss(recon, images) + mse + kl_weight * posterior.kl().mean(), mse.item()


@torch.no_grad()
def latent_stats(vae, seed: int, count: int = 1024) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std of posterior means over ``count`` held-out images."""
    images = pixels(make_dataset(count, seed + HELD_OUT_SEED, RESOLUTION, empty_rate=0.0)[0])
    latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, count, 256)])
    return latents.mean(dim=(0, 2, 3)).tolist(), latents.std(dim=(0, 2, 3)).tolist()


@torch.no_grad()
def save_reconstructions(vae, out: Path, step: int, seed: int, count: int = 16) -> float:
    """Grid of held-out originals (top) and reconstructions (bottom) in ``OUT/samples``; returns the PSNR in dB."""
    originals = make_dataset(count, seed + HELD_OUT_SEED, RESOLUTION, empty_rate=0.0)[0]
    recon = vae.decode(vae.encode(pixels(originals)).latent_dist.mean).sample.clamp(-1, 1)
    recon = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    common.image_grid([list(originals), list(recon)]).save(out / "samples" / f"vae_{step:06d}.png")
    mse = np.mean(((originals.astype(np.float32) - recon.astype(np.float32)) / 255.0) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def main(argv: Optional[List[str]] = None) -> None:
    p = common.parser(__doc__.splitlines()[0], out="outputs/training/vae", steps=800, batch=32, lr=5e-4, minutes=12)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    args = p.parse_args(argv)
    out = common.setup(args)
    torch.manual_seed(args.seed)
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step = common.resume(out, {"vae": vae}, optimizer)[0] if args.resume else 0
    budget = common.Budget(args.time_budget)
    while step < args.steps and not budget.spent():
        for group in optimizer.param_groups:
            group["lr"] = args.lr * common.warmup_factor(step, args.warmup)
        images = batch_images(args.seed, step, args.batch)
        loss, mse = vae_loss(vae, images, args.kl_weight, common.step_generator(args.seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 20 == 0:
            seconds = round(budget.elapsed(), 1)
            common.log(out, {"step": step, "loss": round(loss.item(), 5), "mse": round(mse, 5), "seconds": seconds})
        if step % args.checkpoint_every == 0:
            common.save_checkpoint(out, common.training_state(step, {"vae": vae}, optimizer))
        if args.sample_every and step % args.sample_every == 0:
            common.log(out, {"step": step, "psnr": round(save_reconstructions(vae.eval(), out, step, args.seed), 2)})
            vae.train()
    common.save_checkpoint(out, common.training_state(step, {"vae": vae}, optimizer))
    vae.eval()
    mean, std = latent_stats(vae, args.seed)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    psnr = save_reconstructions(vae, out, step, args.seed)
    record = {"step": step, "done": step >= args.steps, "psnr": round(psnr, 2), "vae": str(out / "vae")}
    common.log(out, {**record, "latents_mean": mean, "latents_std": std})


if __name__ == "__main__":
    main()
