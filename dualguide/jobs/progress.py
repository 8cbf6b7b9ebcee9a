"""The progress bar of a whole job, shown by the main process: images done / total, images per second, ETA.

Processes share no memory, so the bar counts the lines the job appends to ``manifest.jsonl`` and
``failures.jsonl`` (a background thread polls their sizes): it also sees the other processes' and
machines' images on a shared folder, and a killed process cannot make it wait.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional

from .manifest import read_lines


class JobProgress:
    """Count the images finished since the start (``already`` were done before) out of ``total``."""

    def __init__(self, manifest_path: str, failures_path: str, total: int, already: int, show: Optional[bool] = None, interval: float = 0.5):
        self.paths = [manifest_path, failures_path]
        self.offsets = [_size(path) for path in self.paths]
        self.made, self.failed = 0, 0
        self.total, self.already, self.interval = total, already, interval
        self.show = sys.stderr.isatty() if show is None else show
        self.bar = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "JobProgress":
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.already, unit="img", desc="batch", dynamic_ncols=True)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.update()
        if self.bar is not None:
            self.bar.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()

    def update(self) -> None:
        """Read the lines appended since the last look and move the bar."""
        counts = []
        for number, path in enumerate(self.paths):
            entries, self.offsets[number] = read_lines(path, self.offsets[number])
            counts.append(len(entries))
        self.made += counts[0]
        self.failed += counts[1]
        if self.bar is not None and sum(counts):
            self.bar.update(sum(counts))
            if self.failed:
                self.bar.set_postfix(failed=self.failed)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
