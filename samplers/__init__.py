"""Samplers by name, sigma schedules and seeded noise for DualGuide-SDXL (k-diffusion underneath)."""

from .registry import SAMPLER_NAMES, get, names
from .schedules import SCHEDULE_NAMES, check_schedule_name, get_sigmas

__all__ = ["SAMPLER_NAMES", "SCHEDULE_NAMES", "check_schedule_name", "get", "get_sigmas", "names"]
