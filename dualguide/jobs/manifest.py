"""``manifest.jsonl`` (one line per finished image) and ``failures.jsonl`` (one line per failed image).

Lines are appended with one ``os.write`` of the whole line to a file opened ``O_APPEND``, then fsynced:
concurrent writers (one per process, several machines on a shared folder) never interleave, and a
killed writer (or a full disk) leaves at most one incomplete last line, which readers skip and the next job
cuts (``cut_torn_line``) before it appends. An entry counts only when its PNG exists (the PNG is written,
atomically, before its line), so the image of a torn line is made again.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .plan import ImageJob, canonical

MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
_ENTRY_START = b'{"id":'  # every line starts with its id, so an entry glued to a killed writer's half line is found again


def append_line(path: str, entry: Dict[str, object]) -> None:
    """Append ``entry`` (which must have ``id``) as one JSON line, atomically, and fsync it."""
    data = (json.dumps({"id": entry["id"], **entry}, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(descriptor, data)
        while written < len(data):  # a short write (a full disk, a signal): finish the line rather than leave half
            written += os.write(descriptor, data[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_lines(path: str, offset: int = 0) -> Tuple[List[Dict[str, object]], int]:
    """The entries of ``path`` from byte ``offset`` on, and the offset after the last complete line.

    A last line without a newline (a writer still writing, or killed) is left for the next read; a line
    that does not parse is skipped, except for a whole entry at its end (written after a killed writer's half line).
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:complete].split(b"\n"):
        entry = _parse(raw)
        if entry is not None:
            entries.append(entry)
    return entries, offset + complete


def cut_torn_line(path: str) -> None:
    """Cut a last line that lacks its newline, so that the next line starts on a line of its own.

    Only while no process appends to ``path`` (the job's main process, holding the job lock, before any writes).
    """
    try:
        with open(path, "r+b") as f:
            data = f.read()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                f.truncate(complete)
    except FileNotFoundError:
        pass


def _parse(raw: bytes) -> Optional[Dict[str, object]]:
    start = 0
    while True:
        try:
            entry = json.loads(raw[start:].decode("utf-8"))
            return entry if isinstance(entry, dict) and "id" in entry else None
        except ValueError:
            start = raw.find(_ENTRY_START, start + 1)
            if start < 0:
                return None


class Manifest:
    """The manifest of one output folder as read at the start of a job: which planned images are done."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, MANIFEST)
        self.failures_path = os.path.join(out, FAILURES)
        entries, self.size = read_lines(self.path)
        self.latest: Dict[str, Dict[str, object]] = {}
        for entry in entries:  # the last line of an id wins (an --overwrite remade it)
            self.latest[str(entry["id"])] = entry

    def is_done(self, job: ImageJob) -> bool:
        entry = self.latest.get(job.id)
        return entry is not None and same_spec(entry, job) and os.path.isfile(os.path.join(self.out, str(entry.get("file"))))

    def conflicts(self, jobs: Sequence[ImageJob]) -> List[Tuple[ImageJob, Dict[str, object]]]:
        """Planned images already made (PNG present) from another prompt, seed, model or settings."""
        found = []
        for job in jobs:
            entry = self.latest.get(job.id)
            if entry is not None and not same_spec(entry, job) and os.path.isfile(os.path.join(self.out, str(entry.get("file")))):
                found.append((job, entry))
        return found

    def record(self, job: ImageJob, seconds: float) -> None:
        append_line(self.path, {"id": job.id, "line": job.line, "index": job.index, **job.spec(), "file": job.file, "seconds": round(seconds, 4)})

    def record_failure(self, job: ImageJob, error: str) -> None:
        append_line(self.failures_path, {"id": job.id, "line": job.line, "index": job.index, "prompt": job.prompt, "seed": job.seed, "error": error})

    def entries(self) -> Iterator[Dict[str, object]]:
        return iter(self.latest.values())

    def compact(self) -> None:
        """Rewrite the manifest with only the last line of each id (after ``--overwrite`` remade images).

        Only when no process writes to it any more; the new file replaces the old one atomically.
        """
        entries, _ = read_lines(self.path)
        latest: Dict[str, Dict[str, object]] = {}
        for entry in entries:
            latest.pop(str(entry["id"]), None)  # keep the order in which the images were (last) made
            latest[str(entry["id"])] = entry
        if len(latest) == len(entries):
            return
        temporary = f"{self.path}.{os.getpid()}.{os.urandom(4).hex()}.partial"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                for entry in latest.values():
                    f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def same_spec(entry: Dict[str, object], job: ImageJob) -> bool:
    return canonical({key: entry.get(key) for key in job.spec()}) == canonical(job.spec())


def differences(entry: Dict[str, object], job: ImageJob) -> List[str]:
    """The names of what differs between a manifest entry and a planned image (``seed``, ``settings.cfg``...)."""
    spec, names = job.spec(), []
    for key, value in spec.items():
        if key == "settings" and isinstance(entry.get(key), dict):
            old = entry[key]
            names += [f"{name}" for name in sorted(set(old) | set(value)) if canonical(old.get(name)) != canonical(value.get(name))]
        elif canonical(entry.get(key)) != canonical(value):
            names.append(key)
    return names
