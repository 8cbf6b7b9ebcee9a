"""``dualguide ui``: the guidance explorer in the browser (optional extra; work in ``dualguide.ui``)."""

from __future__ import annotations

import argparse

from ..generation.limits import Limits
from ..options import add_device_arguments, add_limit_arguments, whole


def add_parser(commands) -> None:
    ui = commands.add_parser("ui", help="a guidance explorer in the browser (needs: pip install 'dualguide-sdxl[ui]')")
    add_device_arguments(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=whole(1, 65535), default=7860, help="port (default 7860)")
    add_limit_arguments(ui)


def run(args: argparse.Namespace) -> int:
    from ..ui import serve  # gradio and torch load only here

    limits = Limits.from_options(vars(args))
    return serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype, limits=limits,
                 allow_pickle=args.allow_pickle)
