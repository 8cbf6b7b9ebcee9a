"""Who may reach the explorer: ``--auth`` / ``--auth-file`` credentials for gradio's login, and the refusal to
serve beyond this machine without them. Checked before anything loads; no gradio, no torch here.
"""

from __future__ import annotations

import ipaddress
from typing import List, Optional, Sequence, Tuple

from ..generation.errors import UsageError

Credential = Tuple[str, str]  # (user, password), as gradio's ``launch(auth=...)`` takes them
FORMAT = "USER:PASSWORD (a user name without ':', a colon, a password; neither empty)"


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: ``localhost``, 127.0.0.0/8, ``::1``."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve to an outside address


def credential(text: str, where: str = "--auth") -> Credential:
    """``USER:PASSWORD`` split at its first colon; UsageError naming ``where`` (never echoing the password)."""
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise UsageError(f"{where}: expected {FORMAT}")
    return user.strip(), password


def read_auth_file(path: str) -> List[Credential]:
    """One ``USER:PASSWORD`` a line (blank lines and ``#`` comments skipped); UsageError naming ``--auth-file``."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        raise UsageError(f"--auth-file: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--auth-file {path}: cannot read it ({type(error).__name__})") from None
    found = [
        credential(line.strip(), f"--auth-file {path} line {number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not found:
        raise UsageError(f"--auth-file {path}: no credentials in it; expected lines of {FORMAT}")
    return found


def credentials(auth: Sequence[str] = (), auth_file: Optional[str] = None) -> List[Credential]:
    """Every ``--auth`` and ``--auth-file`` credential; UsageError for a bad one or a user given twice."""
    found = [credential(text) for text in auth or ()]
    if auth_file is not None:
        found += read_auth_file(auth_file)
    users = [user for user, _ in found]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        raise UsageError(f"--auth: user(s) {', '.join(twice)} given more than once")
    return found


def check_exposure(host: str, auth: Sequence[Credential], insecure: bool = False) -> None:
    """UsageError when ``host`` serves beyond this machine with no login and ``insecure`` is not set."""
    if not auth and not insecure and not is_loopback(host):
        raise UsageError(
            f"--host {host} serves beyond this machine: give --auth USER:PASSWORD or --auth-file PATH "
            "(or --insecure to serve it without a login)"
        )
