"""``dualguide ui``: a guidance explorer in the browser (optional extra: ``pip install -e ".[ui]"``).

``settings`` turns the page's controls into ``dualguide generate`` commands and their pipeline
arguments, ``engine`` runs them on one shared model with live branch previews, ``strips`` draws the
previews, ``app`` is the gradio page. Only ``app`` imports gradio; nothing here is imported by
``dualguide --help``.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from ..generation.limits import Limits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY = 2  # runs at once on the shared model; more wait in gradio's queue


def serve(model=None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "auto", dtype: str = "auto",
          limits: Optional[Limits] = None, allow_pickle: bool = False) -> int:  # fmt: skip
    """Start the explorer and serve until interrupted; the page is up before the model finishes loading.

    ``UsageError`` when gradio is missing, the port is taken or the model cannot be loaded.
    """
    from ..generation.errors import UsageError
    from .engine import Engine

    began = time.perf_counter()
    engine = Engine(model, device=device, dtype=dtype, concurrency=CONCURRENCY, limits=limits or Limits(),
                    allow_pickle=allow_pickle)  # checks the --model path before anything slow
    try:
        from .app import build_app, launch
    except ImportError as error:
        raise UsageError(f"dualguide ui needs gradio ({error}); install it with: pip install 'dualguide-sdxl[ui]'") from None
    demo = build_app(engine)
    try:
        url = launch(demo, host, port, CONCURRENCY)
    except OSError as error:
        raise UsageError(f"--host {host} --port {port}: cannot serve there ({error})") from None
    print(f"dualguide ui: serving {url} ({time.perf_counter() - began:.1f} s); loading the model...", flush=True)
    engine.start()
    try:
        engine.wait()
        if engine.load_error:
            demo.close()
            raise UsageError(engine.load_error)
        print(f"dualguide ui: model ready after {time.perf_counter() - began:.1f} s: {engine.model}; Ctrl+C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("dualguide ui: stopped", file=sys.stderr)
        demo.close()
        return 0
