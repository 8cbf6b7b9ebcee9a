"""``dualguide ui`` in a real browser: headless Chromium driven by Playwright, on the embedded model.

Needs the ``ui`` extra (gradio, playwright) and a Chromium (Debian's ``chromium`` package; another one
with ``DUALGUIDE_CHROMIUM=/path``); skipped without them. Playwright's own browser download is not used.
``DUALGUIDE_UI_SCREENSHOT=docs/ui.png`` also writes the README's screenshot.
"""

import functools
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dualguide import cli
from dualguide.generation import EMBEDDED, call_arguments, recommended_settings
from dualguide.ui import settings as ui_settings
from dualguide.ui.strips import CELL, HEADER, LABEL_WIDTH, rows_for

CHROMIUM = os.environ.get("DUALGUIDE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PROMPT = "a yellow star on a purple background"
SETTINGS = recommended_settings(EMBEDDED)
CFG, TPG = f"{SETTINGS['guidance_scale']:g}", f"{SETTINGS['tpg_scale']:g}"
NAG = f"{SETTINGS['nag_scale']:g}"  # the model's tuned scale, NAG off unless a mode turns it on
DUALGUIDE = [sys.executable, "-c", "import sys; from dualguide.cli import main; sys.exit(main(sys.argv[1:]))"]
TIMEOUT_MS = 240_000  # one run on two busy CPU cores


# --- without a browser: controls -> commands ---------------------------------------------------------------


def test_each_mode_is_one_generate_command_with_its_pipeline_arguments():
    controls = ui_settings.controls_from_settings(SETTINGS)
    controls.prompt, controls.seed, controls.steps = "-a prompt like an option", 7, 3
    runs = ui_settings.plan(controls, SETTINGS)
    assert [run.label for run in runs] == list(ui_settings.DEFAULT_MODES)
    flags = {
        "none": ["--cfg", "1", "--tpg", "0"], "CFG": ["--cfg", CFG, "--tpg", "0"], "CFG+TPG": ["--cfg", CFG, "--tpg", TPG],
        "CFG+NAG": ["--cfg", CFG, "--tpg", "0", "--nag", NAG], "CFG+TPG+NAG": ["--cfg", CFG, "--tpg", TPG, "--nag", NAG],
    }  # fmt: skip
    for run in runs:
        assert run.argv == ["generate", "--seed", "7", "--steps", "3", *flags[run.label], "--", controls.prompt]
        args = cli.build_parser().parse_args(run.argv)
        assert run.kwargs == call_arguments(vars(args), SETTINGS) and run.seeds == [7]
        assert ui_settings.command_line(run).startswith("dualguide generate --seed 7")
    assert "tpg_scale=0.0" in ui_settings.python_text(runs[:1], EMBEDDED, "cpu", None)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"size": "abc"}, "expected a size in pixels"),
        ({"sampler": "foo"}, "unknown sampler 'foo'"),
        ({"schedule": "linear"}, "unknown schedule 'linear'"),
        ({"seed": None}, "seed: enter a whole number"),
        ({"cfg_interval": (0.8, 0.2)}, "START <= END"),
        ({"modes": []}, "choose at least one mode"),
        ({"size": "100000x64"}, "width 100000 px is over the bound --max-side 4096"),
        ({"steps": 501}, "--steps 501: over the bound --max-steps 500"),
    ],
)
def test_controls_the_command_refuses_raise_its_message(change, message):
    controls = ui_settings.controls_from_settings(SETTINGS)
    for name, value in change.items():
        setattr(controls, name, value)
    with pytest.raises(ui_settings.SettingsError, match=re.escape(message)):
        ui_settings.plan(controls, SETTINGS)


# --- the command ------------------------------------------------------------------------------------------


def test_help_does_not_import_gradio_or_torch():
    code = "import sys; from dualguide import cli; cli.build_parser(); print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_missing_model_is_one_line_and_status_2():
    done = subprocess.run([*DUALGUIDE, "ui", "--model", "/no/such/model"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "dualguide: error: --model: no such file or folder: /no/such/model\n"


# --- in the browser ---------------------------------------------------------------------------------------

needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="the ui extra is not installed (gradio)")
needs_chromium = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None or importlib.util.find_spec("playwright") is None or not os.path.exists(CHROMIUM),
    reason=f"needs the ui extra (gradio, playwright) and Chromium at {CHROMIUM} (apt-get install chromium)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import torch

    from dualguide.ui.app import build_app, launch
    from dualguide.ui.engine import Engine

    threads = torch.get_num_threads()
    engine = Engine(None, concurrency=2).start(background=False)  # one CPU thread per run on two cores
    assert engine.pipe is not None, engine.load_error
    demo = build_app(engine)
    url = launch(demo, "127.0.0.1", free_port(), concurrency=engine.concurrency)
    assert demo.share is False  # never a public link
    yield url, engine
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url, width=1400):
    page = browser.new_context(viewport={"width": width, "height": 1000}).new_page()
    page.goto(url)
    page.wait_for_selector("#generate")
    page.wait_for_function("(document.querySelector('#status') || {innerText: ''}).innerText.includes('Ready')", timeout=TIMEOUT_MS)
    return page


def set_controls(page, prompt=None, seed=None, steps=None, size=None, modes=None, cfg=None, tpg_layers=None, sampler=None):
    text = ":is(input, textarea)"
    for selector, value in (("#prompt " + text, prompt), ("#seed input", seed), ("#steps input", steps), ("#size " + text, size),
                            ("#cfg input[type=number]", cfg), ("#tpg-layers " + text, tpg_layers)):  # fmt: skip
        if value is not None:
            page.fill(selector, str(value))
            page.press(selector, "Tab")
    if sampler is not None:
        page.fill("#sampler input", sampler)
        page.press("#sampler input", "Enter")
    if modes is not None:
        for name in ui_settings.MODES:
            box = page.locator(f'#modes input[name="{name}"]')
            box.check() if name in modes else box.uncheck()


def clicks(page) -> int:
    """How many runs this page has started (the status line's ``data-run``)."""
    return int(page.get_attribute("#status [data-run]", "data-run"))


def generate(page, until=("Done", "Error", "Cancelled")) -> str:
    run = clicks(page) + 1
    page.click("#generate")
    return wait_status(page, until, run)


def wait_status(page, until, run=None) -> str:
    """The status text once it holds one of ``until`` (for click ``run`` of the page, default the latest)."""
    run = clicks(page) if run is None else run
    condition = " || ".join(f"t.includes({json.dumps(word)})" for word in until)
    page.wait_for_function(
        f"""(() => {{ const s = document.querySelector('#status [data-run="{run}"]'); if (!s) return false;
                     const t = s.innerText; return {condition}; }})()""",
        timeout=TIMEOUT_MS,
    )
    return page.inner_text("#status")


def page_pngs(page):
    """The PNGs the page offers for download (the gallery shows the same files), fetched as the browser does."""
    links = page.eval_on_selector_all("#files a[href*='file=']", "links => links.map(a => a.href)")
    pngs = [Image.open(io.BytesIO(page.request.get(link).body())) for link in links]
    shown = page.eval_on_selector_all("#finals img", "images => images.map(i => i.src)")
    assert len(shown) == len(pngs)
    return pngs


def command_png(tmp_path, argv):
    """The PNG ``dualguide generate`` writes for ``argv``, run in this process."""
    out = tmp_path / f"command{len(os.listdir(tmp_path))}"
    assert cli.main([*argv, "--out", str(out)]) == 0
    (name,) = os.listdir(out)
    return Image.open(out / name)


def assert_same_image(ui_png, command_png):
    assert ui_png.size == command_png.size
    difference = np.abs(np.asarray(ui_png.convert("RGB"), np.int16) - np.asarray(command_png.convert("RGB"), np.int16))
    assert difference.max() <= 1, f"pixel difference {difference.max()}/255"
    assert json.loads(ui_png.text["parameters"]) == json.loads(command_png.text["parameters"])


def mode_flags(mode, cfg=CFG, nag=NAG):
    terms = ui_settings.MODES[mode]
    flags = ["--cfg", cfg if "cfg" in terms else "1", "--tpg", TPG if "tpg" in terms else "0"]
    return flags + (["--nag", nag] if "nag" in terms else [])


@needs_chromium
def test_generated_images_equal_the_command_and_show_branch_strips(server, browser, tmp_path):
    url, engine = server
    page = open_page(browser, url)
    set_controls(page, prompt=PROMPT, seed=3, steps=3)
    began = time.perf_counter()
    status = generate(page)
    print(f"\nfive modes, 3 steps: {time.perf_counter() - began:.1f} s in the browser; {status.strip()}")
    assert status.startswith("Done: 5 image(s)"), status
    pngs = page_pngs(page)
    assert len(pngs) == 5
    for mode, png in zip(ui_settings.DEFAULT_MODES, pngs):
        argv = ["generate", PROMPT, "--seed", "3", "--steps", "3", *mode_flags(mode)]
        assert_same_image(png, command_png(tmp_path, argv))
        assert " ".join(argv[2:]) in page.inner_text("#command").replace("'", "")  # the shown command, flags as given here
    strips = page.eval_on_selector_all(".dg-strip img", "images => images.map(i => [i.naturalWidth, i.naturalHeight])")
    # a column per step (3) next to the row labels; a row per branch of the mode's UNet call
    rows = [len(rows_for(ui_settings.MODES[mode])) for mode in ui_settings.DEFAULT_MODES]
    assert strips == [[LABEL_WIDTH + 3 * CELL, HEADER + n * CELL + 4] for n in rows]  # none: cond, guided; CFG+TPG: 4 rows


@needs_chromium
def test_the_nag_example_sets_a_nag_negative_that_the_nag_modes_use(server, browser, tmp_path):
    url, engine = server
    page = open_page(browser, url)
    prompt, negative, nag_negative = ui_settings.NAG_EXAMPLES["embedded"][0]
    page.locator("#nag-examples").get_by_text(prompt).first.click()
    page.wait_for_function(f"document.querySelector('#nag-negative textarea').value === {json.dumps(nag_negative)}")
    assert page.input_value("#prompt textarea") == prompt and page.input_value("#negative textarea") == negative
    checked = [name for name in ui_settings.MODES if page.locator(f'#modes input[name="{name}"]').is_checked()]
    assert checked == list(ui_settings.NAG_EXAMPLE_MODES)
    set_controls(page, seed=2, steps=3)
    assert generate(page).startswith("Done: 4 image(s)")
    for mode, png in zip(ui_settings.NAG_EXAMPLE_MODES, page_pngs(page)):
        flags = ["--nag-negative", nag_negative] if "nag" in ui_settings.MODES[mode] else []
        argv = ["generate", prompt, "--seed", "2", "--steps", "3", *mode_flags(mode), *flags]
        assert_same_image(png, command_png(tmp_path, argv))


@needs_chromium
def test_two_pages_at_once_each_get_their_own_images(server, browser, tmp_path):
    url, engine = server
    first, second = open_page(browser, url), open_page(browser, url)
    set_controls(first, prompt=PROMPT, seed=11, steps=8, modes=["CFG+TPG"])
    set_controls(second, prompt="a green square on a white background", seed=12, steps=8, modes=["CFG+NAG"], cfg=3)
    engine.peak = engine.active
    first.click("#generate")
    second.click("#generate")
    statuses = [wait_status(page, ("Done", "Error", "Cancelled"), run=1) for page in (first, second)]
    print(f"\ntwo pages: {statuses}; runs at once: {engine.peak}")
    assert all(status.startswith("Done: 1 image(s)") for status in statuses), statuses
    assert engine.peak == 2  # both ran at once on the one loaded model
    expected = [
        ["generate", PROMPT, "--seed", "11", "--steps", "8", *mode_flags("CFG+TPG")],
        ["generate", "a green square on a white background", "--seed", "12", "--steps", "8", *mode_flags("CFG+NAG", cfg="3")],
    ]
    for page, argv in zip((first, second), expected):
        (png,) = page_pngs(page)
        assert_same_image(png, command_png(tmp_path, argv))


@needs_chromium
def test_cancel_stops_within_one_step_and_the_next_run_succeeds(server, browser, tmp_path):
    from conftest import unet_snapshot

    url, engine = server
    clean = unet_snapshot(engine.pipe.unet)
    page = open_page(browser, url)
    set_controls(page, prompt=PROMPT, seed=5, steps=60)
    page.click("#generate")
    wait_status(page, ("step 3/60",), run=1)
    page.click("#cancel")
    status = wait_status(page, ("Cancelled", "Done", "Error"), run=1)
    assert status.startswith("Cancelled"), status
    cancel = engine.last_cancel
    (asked_mode, asked_step), (stopped_mode, stopped_step) = cancel["requested_after"], cancel["stopped_after"]
    more = stopped_step - asked_step if stopped_mode == asked_mode else stopped_step
    print(f"\ncancel asked after step {asked_step} of mode {asked_mode}, stopped after step {stopped_step}: {status.strip()}")
    assert stopped_mode <= asked_mode + 1 and more <= 1
    assert unet_snapshot(engine.pipe.unet) == clean  # no hooks, the original processors
    assert len(page_pngs(page)) == asked_mode  # the modes finished before the cancel
    set_controls(page, steps=3, modes=["CFG+TPG+NAG"])
    assert generate(page).startswith("Done: 1 image(s)")
    (png,) = page_pngs(page)
    assert_same_image(png, command_png(tmp_path, ["generate", PROMPT, "--seed", "5", "--steps", "3", *mode_flags("CFG+TPG+NAG")]))


@needs_chromium
def test_closing_the_page_mid_run_stops_its_run(server, browser):
    url, engine = server
    page = open_page(browser, url)
    set_controls(page, steps=60, modes=["CFG+TPG"])
    page.click("#generate")
    wait_status(page, ("step 2/60",), run=1)
    page.context.close()
    deadline = time.monotonic() + 60
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.active == 0


@needs_gradio
def test_softpag_and_pag_layers_follow_the_python_call_shown(server):
    """What the command line cannot say (SoftPAG beta, PAG layers) is in the notes and in the Python call."""
    import torch

    from dualguide import apply_softpag

    url, engine = server
    controls = ui_settings.controls_from_settings(SETTINGS)
    controls.steps, controls.modes, controls.pag_beta, controls.pag_layers = 3, ["CFG+PAG"], 0.5, "u0-u5"
    (run,) = engine.plan(controls)
    assert run.kwargs["pag_applied_layers_index"] == "u0-u5" and run.softpag_beta == 0.5 and len(run.notes) == 2
    assert "apply_softpag(pipe, beta=0.5)" in engine.python_text([run])
    events = list(engine.run([run], "softpag-test"))
    assert events[-1].kind == "done", events[-1]
    (path,) = [event.image for event in events if event.kind == "image"]
    pipe = engine.request_pipeline()
    apply_softpag(pipe, beta=0.5)
    expected = pipe(run.prompt, generator=[torch.Generator().manual_seed(0)], num_images_per_prompt=1, **run.kwargs).images[0]
    difference = np.abs(np.asarray(Image.open(path).convert("RGB"), np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 1


@needs_chromium
def test_bad_settings_show_a_message_and_the_page_keeps_working(server, browser):
    url, engine = server
    page = open_page(browser, url)
    set_controls(page, steps=2, modes=["CFG+TPG"])
    for change, message in (
        ({"size": "abc"}, "expected a size in pixels such as 64 or 64x96"),
        ({"size": "63x64"}, "width must be a positive integer multiple of the VAE factor 4, got 63"),
        ({"size": "64", "tpg_layers": "d99"}, "unknown layer id(s) d99; valid ranges for this model"),
        ({"tpg_layers": "d0-d23", "sampler": "foo"}, "unknown sampler 'foo'"),
        ({"sampler": "euler", "size": "100000x100000"}, "width 100000 px is over the bound --max-side 4096"),
        ({"size": "64", "steps": 100000}, "--steps 100000: over the bound --max-steps 500"),
    ):
        set_controls(page, **change)
        status = generate(page)
        assert status.startswith("Error:") and message in status, status
        assert "Traceback" not in page.content()
    set_controls(page, sampler="euler", steps=2)
    assert generate(page).startswith("Done: 1 image(s)")


@needs_chromium
@pytest.mark.skipif(not os.environ.get("DUALGUIDE_UI_SCREENSHOT"), reason="set DUALGUIDE_UI_SCREENSHOT=docs/ui.png to write it")
def test_screenshot_for_the_readme(server, browser):
    url, engine = server
    page = open_page(browser, url, width=1500)
    set_controls(page, prompt="a red circle on the right on a green background", seed=1, steps=12)
    assert generate(page).startswith("Done")
    page.eval_on_selector_all("#finals img", "images => images.forEach(i => { i.loading = 'eager'; })")  # gradio's are lazy
    page.wait_for_function("[...document.querySelectorAll('#finals img')].every(i => i.complete && i.naturalWidth > 0)")
    page.locator("#python").evaluate("element => element.style.display = 'none'")
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    shot.quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(os.environ["DUALGUIDE_UI_SCREENSHOT"], optimize=True)


# --- the command serves the page -------------------------------------------------------------------------


@needs_chromium
def test_dualguide_ui_serves_the_page_on_localhost_then_the_model_and_stops_on_ctrl_c(browser):
    import urllib.request

    port = free_port()
    began = time.perf_counter()
    # Ctrl+C as in a terminal, also when the tests run in a background job (which starts with SIGINT ignored).
    restore_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    process = subprocess.Popen([*DUALGUIDE, "ui", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=restore_sigint)  # fmt: skip
    try:
        serving = process.stdout.readline()
        served = time.perf_counter() - began
        assert serving.startswith(f"dualguide ui: serving http://127.0.0.1:{port}/"), serving + process.stderr.read()
        assert b"<html" in urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().lower()
        page = open_page(browser, f"http://127.0.0.1:{port}/")  # "Loading the model…" until it is ready
        assert page.inner_text("#status").startswith("Ready: ")
        ready = process.stdout.readline()
        assert ready.startswith("dualguide ui: model ready"), ready
        print(f"\ndualguide ui: page served after {served:.1f} s, model ready after {time.perf_counter() - began:.1f} s")
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    assert code == 0, process.stderr.read()
