"""``dualguide ui``: the guidance explorer in the browser (optional extra; work in ``dualguide.ui``)."""

from __future__ import annotations

import argparse

from ..generation.limits import Limits
from ..options import add_device_arguments, add_limit_arguments, whole
from ..ui import MAX_QUEUE
from ..ui.access import credentials


def add_parser(commands) -> None:
    ui = commands.add_parser("ui", help="a guidance explorer in the browser (needs: pip install 'dualguide-sdxl[ui]')")
    add_device_arguments(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=whole(1, 65535), default=7860, help="port (default 7860)")
    access = ui.add_argument_group("access (a --host other than loopback needs --auth, --auth-file or --insecure)")
    access.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="a login the page asks for (repeatable; other local users can see it in ps: prefer --auth-file)")  # fmt: skip
    access.add_argument("--auth-file", metavar="PATH", help="logins from a file, one USER:PASSWORD a line")
    access.add_argument("--insecure", action="store_true", help="serve a non-loopback --host without a login")
    access.add_argument("--max-queue", type=whole(1), default=MAX_QUEUE, metavar="N",
                        help=f"most runs waiting; one more is refused with a message (default {MAX_QUEUE})")  # fmt: skip
    add_limit_arguments(ui)


def run(args: argparse.Namespace) -> int:
    from ..ui import serve  # gradio and torch load only here

    limits = Limits.from_options(vars(args))
    return serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype, limits=limits,
                 allow_pickle=args.allow_pickle, auth=credentials(args.auth, args.auth_file), insecure=args.insecure,
                 max_queue=args.max_queue)  # fmt: skip
