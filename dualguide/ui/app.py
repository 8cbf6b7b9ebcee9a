"""The gradio page of the guidance explorer: controls on the left; status, final images, live branch
strips, PNGs and the equivalent commands on the right. Imported only by ``dualguide ui``."""

from __future__ import annotations

import html
import os
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; before gradio is imported

import gradio as gr  # noqa: E402

from . import settings as ui_settings  # noqa: E402
from .engine import Engine  # noqa: E402

TITLE = "DualGuide guidance explorer"
SESSIONS = 200  # pages whose state the server keeps, least recently used dropped (gradio's 10000 grows memory per visitor)
CSS = """
#status .dg-error { color: #b00020; font-weight: 600; }
#status progress { width: 100%; height: 10px; }
#finals .grid-wrap, #finals .gallery-container { height: auto !important; min-height: 0 !important; max-height: none !important; }
.dg-strip img { width: 100%; height: auto; max-height: none; object-fit: contain; }
"""


def _theme():
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def _status(text: str, fraction: Optional[float] = None, error: bool = False, run: int = 0) -> str:
    """The status line (``data-run``: which click of this page it belongs to) and a progress bar."""
    body = f'<div class="{"dg-error" if error else "dg-status"}" data-run="{run}">{html.escape(text)}</div>'
    if fraction is not None:
        body += f'<progress value="{fraction:.4f}" max="1"></progress>'
    return body


def _interval_controls(term: str, value: Tuple[float, float]):
    with gr.Row():
        start = gr.Slider(0.0, 1.0, value=value[0], step=0.05, label=f"{term} on from (fraction)", elem_id=f"{term.lower()}-start")
        end = gr.Slider(0.0, 1.0, value=value[1], step=0.05, label=f"{term} on until (fraction)", elem_id=f"{term.lower()}-end")
    return start, end


def build_app(engine: Engine) -> gr.Blocks:
    """The page for ``engine`` (whose model may still be loading)."""
    import samplers

    defaults = ui_settings.controls_from_settings(engine.settings, engine.pag_layers)
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as demo:  # served files live a day
        gr.Markdown(
            f"## {TITLE}\nThe same seed under each guidance mode, side by side; during sampling, the decoded x0 "
            "prediction of every branch (uncond, cond, perturbed, guided) every few steps. "
            f"Model: `{engine.model_option or 'embedded 64 px model'}`."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                c: Dict[str, gr.components.Component] = {}
                c["prompt"] = gr.Textbox(value=defaults.prompt, label="Prompt", lines=2, elem_id="prompt")
                c["negative"] = gr.Textbox(label="Negative prompt (CFG)", elem_id="negative")
                c["nag_negative"] = gr.Textbox(label="NAG negative prompt (else the negative prompt)", elem_id="nag-negative")
                with gr.Row():
                    c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    c["steps"] = gr.Number(value=defaults.steps, precision=0, minimum=1, label="Steps", elem_id="steps")
                    c["size"] = gr.Textbox(value=defaults.size, label="Size (WIDTHxHEIGHT)", elem_id="size")
                with gr.Row():
                    c["sampler"] = gr.Dropdown(list(samplers.SAMPLER_NAMES), value=defaults.sampler, allow_custom_value=True,
                                               label="Sampler", elem_id="sampler")  # fmt: skip
                    c["schedule"] = gr.Dropdown(list(samplers.SCHEDULE_NAMES), value=defaults.schedule, allow_custom_value=True,
                                                label="Schedule", elem_id="schedule")  # fmt: skip
                c["modes"] = gr.CheckboxGroup(list(ui_settings.MODES), value=list(defaults.modes), elem_id="modes",
                                              label="Modes, side by side from the same seed")  # fmt: skip
                with gr.Accordion("CFG", open=True):
                    c["cfg"] = gr.Slider(1.0, 15.0, value=defaults.cfg, step=0.1, label="CFG scale", elem_id="cfg")
                    c["cfg_start"], c["cfg_end"] = _interval_controls("CFG", defaults.cfg_interval)
                with gr.Accordion("TPG: token perturbation", open=True):
                    c["tpg"] = gr.Slider(0.0, 10.0, value=defaults.tpg, step=0.1, label="TPG scale", elem_id="tpg")
                    c["tpg_layers"] = gr.Textbox(value=defaults.tpg_layers, label="TPG layers (d/m/u ids, j for SD3; ranges, e.g. d6-d23,m0)",
                                                 elem_id="tpg-layers")  # fmt: skip
                    c["tpg_start"], c["tpg_end"] = _interval_controls("TPG", defaults.tpg_interval)
                with gr.Accordion("PAG / SoftPAG", open=False):
                    c["pag"] = gr.Slider(0.0, 10.0, value=defaults.pag, step=0.1, label="PAG scale", elem_id="pag")
                    c["pag_layers"] = gr.Textbox(value=defaults.pag_layers, label="PAG layers", elem_id="pag-layers")
                    c["pag_beta"] = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="SoftPAG beta (1 = PAG)", elem_id="pag-beta")
                    c["pag_start"], c["pag_end"] = _interval_controls("PAG", defaults.pag_interval)
                with gr.Accordion("NAG: normalized attention guidance", open=True):
                    c["nag"] = gr.Slider(1.0, 10.0, value=defaults.nag, step=0.1, label="NAG scale", elem_id="nag")
                    with gr.Row():
                        c["nag_tau"] = gr.Number(value=defaults.nag_tau, label="NAG tau", elem_id="nag-tau")
                        c["nag_alpha"] = gr.Number(value=defaults.nag_alpha, label="NAG alpha", elem_id="nag-alpha")
                    c["nag_start"], c["nag_end"] = _interval_controls("NAG", defaults.nag_interval)
                c["preview_every"] = gr.Slider(0, 20, value=0, step=1, label="Strip column every N steps (0: about six columns)",
                                               elem_id="preview-every")  # fmt: skip
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                gr.Examples(ui_settings.nag_examples(embedded=engine.model_option is None),
                            [c["prompt"], c["negative"], c["nag_negative"], c["modes"]], elem_id="nag-examples",
                            label="What NAG is for: a NAG negative prompt, acting with CFG off (NAG) and beside CFG")  # fmt: skip
            with gr.Column(scale=5):
                status = gr.HTML(_status("Ready." if engine.ready else "Loading the model…"), elem_id="status")
                finals = gr.Gallery(label="Final images (same seed)", columns=5, format="png", object_fit="contain",
                                    elem_id="finals")  # fmt: skip
                gr.Markdown("**Branch x0 predictions during sampling**: a strip per mode; rows are the branches of "
                            "the step's one UNet call, columns every few steps (grey: the branch is off at that step).")
                strips = [gr.Image(visible=False, format="png", type="pil", interactive=False, buttons=["download", "fullscreen"],
                                   elem_id=f"strip-{i}", elem_classes=["dg-strip"]) for i in range(len(ui_settings.MODES))]  # fmt: skip
                files = gr.File(label="PNGs with their settings (parameters text chunk)", file_count="multiple", elem_id="files")
                command = gr.Code(language="shell", label="Equivalent dualguide generate commands", elem_id="command",
                                  interactive=False, wrap_lines=True)  # fmt: skip
                python = gr.Code(language="python", label="Equivalent Python calls", elem_id="python", interactive=False,
                                 wrap_lines=True)  # fmt: skip

        clicks = gr.State(0)
        outputs = [clicks, status, finals, *strips, files, command, python]

        def run(data, request: gr.Request):
            session = getattr(request, "session_hash", None) or uuid.uuid4().hex
            number = int(data[clicks] or 0) + 1  # this page's click, in the status's data-run for scripts and tests

            def say(text: str, fraction: Optional[float] = None, error: bool = False):
                return {status: _status(text, fraction, error, number)}

            began = time.perf_counter()
            clear = {clicks: number, finals: [], files: None, **{strip: gr.update(value=None, visible=False) for strip in strips}}
            try:
                runs = engine.plan(_controls(c, data))
            except (ValueError, TypeError) as error:
                yield {**clear, **say(f"Error: {error}", error=True), command: "", python: ""}
                return
            every = int(data[c["preview_every"]] or 0)
            yield {**clear, **say("Starting…", 0.0), command: ui_settings.commands_text(runs), python: engine.python_text(runs)}
            final_images: List[Tuple[str, str]] = []
            first: Optional[float] = None
            total = sum(r.steps for r in runs)
            done_before = [sum(r.steps for r in runs[:i]) for i in range(len(runs))]
            for event in engine.run(runs, session, every):
                if event.kind == "progress":
                    sigma = "" if event.sigma is None else f" · σ {event.sigma:.3g}"
                    text = f"{event.label} ({event.mode + 1}/{len(runs)}) · step {event.step}/{event.steps}{sigma}"
                    yield say(text, (done_before[event.mode] + event.step) / total)
                elif event.kind == "strip":
                    yield {strips[event.mode]: gr.update(value=event.image, label=event.label, visible=True)}
                elif event.kind == "image":
                    first = first if first is not None else time.perf_counter() - began
                    final_images.append((event.image, event.label))
                    yield {finals: list(final_images), files: [path for path, _ in final_images]}
                elif event.kind == "done":
                    seconds = time.perf_counter() - began
                    yield say(f"Done: {len(final_images)} image(s) in {seconds:.1f} s (first after {first or seconds:.1f} s).", 1.0)
                elif event.kind == "cancelled":
                    yield say(f"Cancelled: {event.message}. The model is ready for the next run.")
                else:
                    yield say(f"Error: {event.message}", error=True)

        def stop(request: gr.Request):
            """Ask this page's run to stop after its current step (the run's own status says when it has)."""
            session = getattr(request, "session_hash", None)
            if session is not None:
                engine.cancel(session)

        def describe_model(number: int = 0):
            if engine.ready:
                return _status(f"Ready: {engine.model} on {engine.device} ({engine.dtype}).", run=number)
            if engine.load_error:
                return _status(f"Error: the model could not be loaded: {engine.load_error}", error=True, run=number)
            return _status("Loading the model… (Generate waits for it)", run=number)

        generate.click(run, inputs={clicks, *c.values()}, outputs=outputs, show_progress="hidden", concurrency_id="generate",
                       api_name="generate")  # fmt: skip
        cancel.click(stop, inputs=None, outputs=None, queue=False, show_progress="hidden", api_name="cancel")
        demo.load(lambda: describe_model(0), inputs=None, outputs=status, queue=False, show_progress="hidden")
        if not engine.ready:  # the page is up before the model: say when it is ready, then stop asking
            waiting = gr.Timer(1.0)

            def poll(number):
                if engine.ready or engine.load_error:
                    return {status: describe_model(number), waiting: gr.Timer(active=False)}
                return {status: gr.skip()}

            waiting.tick(poll, inputs=clicks, outputs=[status, waiting], queue=False, api_visibility="private")
    return demo


def _controls(c: Dict[str, gr.components.Component], data) -> ui_settings.Controls:
    value = {name: data[component] for name, component in c.items()}
    fields = {name: value[name] for name in (
        "prompt", "negative", "nag_negative", "seed", "steps", "sampler", "schedule", "size", "cfg", "tpg",
        "tpg_layers", "pag", "pag_layers", "pag_beta", "nag", "nag_tau", "nag_alpha", "modes",
    )}  # fmt: skip
    for number in ("cfg", "tpg", "pag", "pag_beta", "nag", "nag_tau", "nag_alpha"):
        if fields[number] is None:
            raise ValueError(f"{number.replace('_', ' ')}: enter a number")
    for term in ui_settings.TERMS:
        fields[f"{term}_interval"] = (float(value[f"{term}_start"]), float(value[f"{term}_end"]))
    fields["prompt"] = fields["prompt"] or ""
    fields["negative"] = fields["negative"] or ""
    fields["nag_negative"] = fields["nag_negative"] or ""
    fields["tpg_layers"] = fields["tpg_layers"] or ""
    fields["pag_layers"] = fields["pag_layers"] or ""
    return ui_settings.Controls(**fields)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 2, max_queue: int = 16,
           auth: Sequence[Tuple[str, str]] = ()) -> str:  # fmt: skip
    """Serve ``demo`` on ``host:port`` (never a public share link) without blocking; returns the local URL.

    ``concurrency`` runs at once, at most ``max_queue`` more waiting (a request past that is refused at once:
    "This application is currently busy" in the page, ``QueueError`` in gradio_client); ``auth``: the users of
    gradio's login page (none: no login).
    """
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True, show_error=False,
        ssr_mode=False, mcp_server=False, pwa=False, theme=_theme(), css=CSS, footer_links=[],
        auth=list(auth) or None, auth_message=f"{TITLE}: log in" if auth else None, state_session_capacity=SESSIONS,
    )  # fmt: skip
    return demo.local_url
