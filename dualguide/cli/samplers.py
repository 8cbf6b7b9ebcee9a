"""``dualguide samplers``: the sampler and schedule names, with a note on the samplers that need one."""

from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    commands.add_parser("samplers", help="list the sampler and schedule names")


def run(args: argparse.Namespace) -> int:
    from samplers.registry import SAMPLER_NAMES, SAMPLER_NOTES
    from samplers.schedules import SCHEDULE_NAMES

    print("samplers: " + ", ".join(SAMPLER_NAMES))
    print("schedules: " + ", ".join(SCHEDULE_NAMES))
    for name, note in SAMPLER_NOTES.items():
        print(f"{name}: {note}")
    return 0
