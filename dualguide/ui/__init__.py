"""``dualguide ui``: a guidance explorer in the browser (optional extra: ``pip install -e ".[ui]"``).

``settings`` turns the page's controls into ``dualguide generate`` commands and their pipeline
arguments, ``engine`` runs them on one shared model with live branch previews, ``strips`` draws the
previews, ``access`` checks who may reach the page, ``app`` is the gradio page. Only ``app`` imports
gradio; nothing here is imported by ``dualguide --help``.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from ..generation.limits import Limits
from .access import Credential, check_exposure

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY = 2  # runs at once on the shared model; more wait in gradio's queue
MAX_QUEUE = 16  # runs waiting at most; one more is refused with gradio's "busy" message


def serve(model=None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "auto", dtype: str = "auto",
          limits: Optional[Limits] = None, allow_pickle: bool = False, auth: Sequence[Credential] = (),
          insecure: bool = False, max_queue: int = MAX_QUEUE) -> int:  # fmt: skip
    """Start the explorer and serve until interrupted; the page is up before the model finishes loading.

    ``auth``: the (user, password) pairs of gradio's login (none: no login, which only a loopback ``host``
    or ``insecure`` allows); ``max_queue``: the most runs waiting, past which a request is refused in words.
    ``UsageError`` for a non-loopback host without a login, when gradio is missing, the port is taken or the
    model cannot be loaded; ``ValueError`` for a ``max_queue`` that is not a positive integer.
    """
    from ..generation.errors import UsageError

    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue: expected a positive integer, got {max_queue!r}")
    check_exposure(host, auth, insecure)  # before anything loads
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
        url = launch(demo, host, port, CONCURRENCY, max_queue, auth)
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
