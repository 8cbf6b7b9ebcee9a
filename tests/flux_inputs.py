"""Seeded Flux inputs for the tiny Flux layouts' tests: prompt embeds with pooled embeds, and the negatives made of them."""

import torch

TEXT = 96  # the tiny T5's width


def embeds(seed: int, rows: int = 1):
    """``(prompt_embeds [rows, 16, TEXT], pooled_prompt_embeds [rows, 32])`` drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, TEXT, generator=generator), torch.randn(rows, 32, generator=generator)


def negative(seed=200):
    """CFG's negative embeds, as the Flux pipelines take them."""
    prompt_embeds, pooled = embeds(seed)
    return dict(negative_prompt_embeds=prompt_embeds, negative_pooled_prompt_embeds=pooled)


def nag_negative(seed=300):
    """NAG's negative embeds, as the project's Flux pipelines take them."""
    prompt_embeds, pooled = embeds(seed)
    return dict(nag_negative_prompt_embeds=prompt_embeds, nag_negative_pooled_prompt_embeds=pooled)
