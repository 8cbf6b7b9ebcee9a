"""``dualguide ui`` safe to share: a login (gradio's auth), no unauthenticated serving beyond loopback, a bounded
queue that refuses in words, and sessions that keep their own images under load.

The browser tests need the ``ui`` extra and Debian's Chromium, as tests/test_ui.py; the load test needs gradio
(gradio_client comes with it) and runs ``dualguide ui`` as a process on 127.0.0.1 only.
"""

import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dualguide import cli
from dualguide.generation.errors import UsageError
from dualguide.ui import access
from dualguide.ui import settings as ui_settings
from test_ui import DUALGUIDE, TIMEOUT_MS, browser, free_port, needs_chromium, needs_gradio, set_controls  # noqa: F401 (browser: a fixture)

USER, PASSWORD = "alice", "s3cret:with colon"
CLIENTS = 12  # the load test's concurrent clients
LOAD_QUEUE = 4  # the load test server's --max-queue: with 2 runs at once, 12 at once overflow it
LOAD_STEPS = 3


# --- refused before anything loads ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_a_non_loopback_host_without_auth_is_one_line_status_2_before_any_model_loads(host):
    code = (
        "import sys; from dualguide.cli import main; status = main(sys.argv[1:]); "
        "print(status, sorted(m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules))"
    )
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "ui", "--host", host, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout == "2 []\n"  # status 2; neither torch nor gradio imported, so no model loaded
    assert done.stderr == (
        f"dualguide: error: --host {host} serves beyond this machine: give --auth USER:PASSWORD or --auth-file PATH "
        "(or --insecure to serve it without a login)\n"
    )
    print(f"\n--host {host}: refused in {time.perf_counter() - began:.1f} s")


def test_loopback_hosts_need_no_login_and_others_need_auth_or_insecure():
    for host in ("127.0.0.1", "127.4.5.6", "localhost", "LOCALHOST", "::1", "[::1]"):
        assert access.is_loopback(host), host
        access.check_exposure(host, [])
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.5", "example.com", "127.0.0.1.example.com"):
        assert not access.is_loopback(host), host
        with pytest.raises(UsageError, match=re.escape(f"--host {host} serves beyond this machine")):
            access.check_exposure(host, [])
        access.check_exposure(host, [(USER, PASSWORD)])
        access.check_exposure(host, [], insecure=True)


def test_credentials_split_at_the_first_colon_and_come_from_both_options(tmp_path):
    path = tmp_path / "logins"
    path.write_text("# who may log in\n\nbob:pw one\n  carol:x:y  \n")
    assert access.credentials([f"{USER}:{PASSWORD}"], str(path)) == [(USER, PASSWORD), ("bob", "pw one"), ("carol", "x:y")]


def _auth_file(tmp_path, text):
    path = tmp_path / "logins"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-queue", "0"], "argument --max-queue: expected a whole number >= 1, got '0'"),
        (["--max-queue", "-3"], "argument --max-queue: expected a whole number >= 1, got '-3'"),
        (["--max-queue", "1.5"], "argument --max-queue: expected a whole number >= 1, got '1.5'"),
        (["--max-queue", "many"], "argument --max-queue: expected a whole number >= 1, got 'many'"),
        (["--auth", "alice"], f"--auth: expected {access.FORMAT}"),
        (["--auth", ":secret"], f"--auth: expected {access.FORMAT}"),
        (["--auth", "alice:"], f"--auth: expected {access.FORMAT}"),
        (["--auth", "a:1", "--auth", "a:2"], "--auth: user(s) a given more than once"),
        (["--auth-file", "/no/such/logins"], "--auth-file: no such file: /no/such/logins"),
        (["--auth-file", "{folder}"], "--auth-file {folder}: cannot read it (IsADirectoryError)"),
        (["--auth-file", "{file}"], "--auth-file {file} line 2: expected " + access.FORMAT),
        (["--auth-file", "{empty}"], "--auth-file {empty}: no credentials in it; expected lines of " + access.FORMAT),
    ],
)
def test_bad_access_options_are_one_line_and_status_2(options, message, tmp_path, capsys):
    paths = {"folder": str(tmp_path), "file": _auth_file(tmp_path, "alice:ok\nbob-with-secret-no-colon\n"),
             "empty": str(tmp_path / "empty")}  # fmt: skip
    (tmp_path / "empty").write_text("# nobody\n\n")
    options = [option.format(**paths) for option in options]
    assert cli.main(["ui", "--host", "0.0.0.0", "--port", str(free_port()), *options]) == 2
    err = capsys.readouterr().err
    assert err == f"dualguide: error: {message.format(**paths)}\n"
    assert "secret" not in err  # a password (or a line that may be one) is never echoed


def test_serve_refuses_a_bad_max_queue_before_anything_loads():
    from dualguide.ui import serve

    for bad in (0, -1, 1.5, "16", True):
        with pytest.raises(ValueError, match=re.escape(f"max_queue: expected a positive integer, got {bad!r}")):
            serve(host="0.0.0.0", max_queue=bad)


# --- the login and the queue in a browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    """The explorer behind a login, one run at a time and one waiting: a third request overflows the queue."""
    import torch

    from dualguide.ui.app import build_app, launch
    from dualguide.ui.engine import Engine

    threads = torch.get_num_threads()
    engine = Engine(None, concurrency=1).start(background=False)
    assert engine.pipe is not None, engine.load_error
    demo = build_app(engine)
    url = launch(demo, "127.0.0.1", free_port(), concurrency=1, max_queue=1, auth=[(USER, PASSWORD)])
    yield url, engine
    demo.close()
    torch.set_num_threads(threads)


def log_in(browser, url, user, password):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.wait_for_selector("input[type=password]")
    assert "log in" in page.inner_text("body") and page.locator("#generate").count() == 0  # the login page, not the app
    page.fill("input[data-testid=textbox]", user)
    page.fill("input[type=password]", password)
    page.get_by_role("button", name="Login").click()
    return page


def wait_for_status(page, test: str, text: str, timeout: int) -> None:
    """Wait until the page's status line ``includes`` / ``startsWith`` ``text`` (an absent status line, which gradio
    renders a moment after the page's first components, reads as empty)."""
    page.wait_for_function(f"(document.querySelector('#status') || {{innerText: ''}}).innerText.{test}({text!r})", timeout=timeout)


@needs_chromium
def test_the_page_asks_for_a_login_refuses_a_wrong_password_and_lets_the_right_one_in(guarded, browser):
    import urllib.error
    import urllib.request

    url, engine = guarded
    with pytest.raises(urllib.error.HTTPError) as refused:  # the API too, not only the page
        urllib.request.urlopen(url + "config", timeout=30)
    assert refused.value.code == 401
    began = time.perf_counter()
    page = log_in(browser, url, USER, PASSWORD + "x")
    page.wait_for_selector("text=Incorrect Credentials", timeout=30_000)
    assert page.locator("#generate").count() == 0
    page = log_in(browser, url, USER, PASSWORD)
    page.wait_for_selector("#generate", timeout=60_000)
    wait_for_status(page, "includes", "Ready", TIMEOUT_MS)
    set_controls(page, steps=2, modes=["CFG"])
    page.click("#generate")
    wait_for_status(page, "startsWith", "Done: 1 image(s)", TIMEOUT_MS)
    print(f"\nlogin refused, then accepted, then one run: {time.perf_counter() - began:.1f} s")


class Client:
    """A gradio_client session calling the page's Generate with controls named by their ``elem_id``."""

    def __init__(self, url: str, auth=(USER, PASSWORD)):
        from gradio_client import Client as GradioClient

        self.client = GradioClient(url, auth=auth, verbose=False)
        config = self.client.config
        (self.endpoint,) = [d for d in config["dependencies"] if d.get("api_name") == "generate"]
        self.components = {component["id"]: component for component in config["components"]}

    def _ids(self, ids):
        return [self.components[i]["props"].get("elem_id") for i in ids if self.components[i]["type"] != "state"]

    def submit(self, **controls):
        """Generate with ``controls`` (elem_id -> value), the page's defaults for the rest."""
        inputs = [i for i in self.endpoint["inputs"] if self.components[i]["type"] != "state"]
        values = [controls.get(self.components[i]["props"].get("elem_id"), self.components[i]["props"].get("value")) for i in inputs]
        return self.client.submit(*values, api_name="/generate")

    def outcome(self, job, timeout: float):
        """``(status text, [PNG paths])`` of a finished job (a generator's outputs come in several updates)."""
        job.result(timeout=timeout)
        names = self._ids(self.endpoint["outputs"])
        status = files = None
        for output in job.outputs():
            value = dict(zip(names, output))
            if isinstance(value["status"], str):
                status = value["status"]
            if isinstance(value["files"], list):
                files = value["files"]
        return re.sub("<[^>]+>", "", status or ""), list(files or [])


@needs_chromium
def test_a_request_over_the_queue_is_refused_in_words_in_the_page_and_cancel_still_works(guarded, browser):
    url, engine = guarded

    def ready_page():
        page = log_in(browser, url, USER, PASSWORD)
        wait_for_status(page, "includes", "Ready", TIMEOUT_MS)
        return page

    running, refused = ready_page(), ready_page()
    set_controls(running, steps=500, modes=["CFG"])
    set_controls(refused, steps=2, modes=["CFG"])
    running.click("#generate")  # runs (one at a time) ...
    wait_for_status(running, "includes", "step 1/500", TIMEOUT_MS)
    waiting = Client(url)
    job = waiting.submit(steps=2, modes=["CFG"])  # ... this one waits: the queue (max 1) is full ...
    time.sleep(1.0)
    refused.click("#generate")  # ... so this one is refused at once, in words
    refused.wait_for_selector("text=This application is currently busy", timeout=30_000)
    assert engine.active == 1 and "Ready" in refused.inner_text("#status")  # not queued behind the others, no hang
    running.click("#cancel")  # the page's cancel does not wait in the full queue
    wait_for_status(running, "startsWith", "Cancelled", 60_000)
    assert waiting.outcome(job, timeout=120)[0].startswith("Done: 1 image(s)")
    refused.click("#generate")  # the refused page works once the queue has room
    wait_for_status(refused, "startsWith", "Done: 1 image(s)", TIMEOUT_MS)


# --- the load test -----------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def reference_images(engine, prompts_seeds):
    """What each (prompt, seed) gives on its own: the CFG+TPG mode's pipeline call, one at a time."""
    import torch

    settings = engine.settings
    images = {}
    for prompt, seed in prompts_seeds:
        controls = ui_settings.controls_from_settings(settings)
        controls.prompt, controls.seed, controls.steps, controls.modes = prompt, seed, LOAD_STEPS, ["CFG+TPG"]
        (run,) = ui_settings.plan(controls, settings)
        pipe = engine.request_pipeline()
        images[prompt, seed] = np.asarray(
            pipe(prompt, generator=[torch.Generator().manual_seed(seed)], num_images_per_prompt=1, **run.kwargs).images[0], np.int16
        )
    return images


@needs_gradio
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_twelve_concurrent_clients_get_their_own_image_or_a_refusal_and_memory_returns(guarded, tmp_path):
    """12 gradio_client sessions at once against ``dualguide ui --max-queue 4`` on 127.0.0.1.

    Each asks its own prompt and seed; each gets its own image (equal to what that prompt and seed give alone) or
    gradio's "queue is full" refusal, within a bound; the server's memory is back within 10% of its idle size
    (idle: ready and warmed by one run in each of its two slots, as a server is after its first users).
    """
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    _, engine = guarded  # the in-process model gives the reference images
    logins = _auth_file(tmp_path, f"{USER}:{PASSWORD}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([*DUALGUIDE, "ui", "--host", "127.0.0.1", "--port", str(port), "--auth-file", logins,
                               "--max-queue", str(LOAD_QUEUE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        assert server.stdout.readline().startswith(f"dualguide ui: serving {url}"), server.stderr.read()
        assert server.stdout.readline().startswith("dualguide ui: model ready"), server.stderr.read()
        cold = rss_mib(server.pid)
        warm_clients = [Client(url), Client(url)]
        warm_jobs = [client.submit(prompt="a circle", seed=99, steps=LOAD_STEPS, modes=["CFG+TPG"]) for client in warm_clients]
        for client, job in zip(warm_clients, warm_jobs):
            assert client.outcome(job, timeout=120)[0].startswith("Done: 1 image(s)")
        time.sleep(2)
        idle = rss_mib(server.pid)

        asks = [(f"a {colour} {shape} on a white background", 1000 + k) for k, (colour, shape) in
                enumerate((c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "star"))]  # fmt: skip
        assert len(asks) == CLIENTS
        peak = {"rss": idle}

        together = threading.Barrier(CLIENTS, timeout=120)

        def one(ask):
            prompt, seed = ask
            client = Client(url)
            together.wait()  # logged in and connected: all ask at once
            try:
                job = client.submit(prompt=prompt, seed=seed, steps=LOAD_STEPS, modes=["CFG+TPG"])
                status, files = client.outcome(job, timeout=180)
            except (QueueError, AppError) as refusal:
                return ask, "refused", str(refusal), []
            finally:
                peak["rss"] = max(peak["rss"], rss_mib(server.pid))
            return ask, "done", status, files

        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(pool.map(one, asks, timeout=300))
        seconds = time.perf_counter() - began
        done = [outcome for outcome in outcomes if outcome[1] == "done"]
        refused = [outcome for outcome in outcomes if outcome[1] == "refused"]
        print(f"\n{CLIENTS} clients, --max-queue {LOAD_QUEUE}: {len(done)} done, {len(refused)} refused in {seconds:.1f} s")
        for ask, _, message, _ in refused:
            assert message == "Queue is full! Please try again.", (ask, message)
        assert len(done) + len(refused) == CLIENTS
        assert len(done) >= LOAD_QUEUE and refused  # the queue held its bound, and the bound was reached

        expected = reference_images(engine, [ask for ask, *_ in done])
        for (prompt, seed), _, status, files in done:
            assert status.startswith("Done: 1 image(s)"), (prompt, status)
            (path,) = files
            png = Image.open(path)
            assert json.loads(png.text["parameters"])["prompt"] == prompt and json.loads(png.text["parameters"])["seed"] == seed
            difference = np.abs(np.asarray(png.convert("RGB"), np.int16) - expected[prompt, seed])
            assert difference.max() <= 1, f"{prompt!r} seed {seed}: pixel difference {difference.max()}/255"
        others = list(expected.values())
        assert all(np.abs(a - b).max() > 1 for i, a in enumerate(others) for b in others[i + 1 :])  # a swap would show

        deadline, after = time.monotonic() + 30, rss_mib(server.pid)
        while after > 1.1 * idle and time.monotonic() < deadline:
            time.sleep(1)
            after = rss_mib(server.pid)
        print(f"server memory: {cold:.0f} MiB ready, {idle:.0f} MiB idle after warm-up, {peak['rss']:.0f} MiB at most "
              f"under load, {after:.0f} MiB after ({100 * (after / idle - 1):+.1f}%)")  # fmt: skip
        assert after <= 1.1 * idle
        assert server.poll() is None  # still serving
    finally:
        server.terminate()
        server.wait(timeout=60)
