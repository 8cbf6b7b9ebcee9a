"""The explorer's engine: one loaded model shared by every user, one light pipeline per run, live branch
previews through ``callback_on_step_end``, cancellation within one step. No gradio here."""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional, Sequence

from ..defaults import DEFAULT_LAYERS
from ..generation import models
from ..generation.errors import UsageError, describe_error, one_line
from ..generation.images import save_png
from ..generation.limits import Limits, flag
from ..generation.settings import generators
from ..generation.tasks import Task, task_pipeline
from . import settings as ui_settings
from .strips import Strip, preview_steps, rows_for

TENSOR_INPUTS = ("latents", "denoised", "denoised_uncond", "denoised_cond", "denoised_tpg", "denoised_pag")


@dataclass
class Event:
    """What a run reports, in order: ``progress``, ``strip``, ``image``, then one ``done``/``cancelled``/``error``."""

    kind: str
    mode: int = -1
    label: str = ""
    step: int = 0
    steps: int = 0
    sigma: Optional[float] = None
    image: object = None  # a PIL strip, or the path of a final PNG
    message: str = ""


class Cancelled(Exception):
    pass


def error_message(error: BaseException) -> str:
    """One line for the page: the message of bad input, else ``Type: message`` (never a traceback)."""
    if isinstance(error, (ValueError, TypeError, UsageError)):
        return one_line(str(error)) or type(error).__name__
    return describe_error(error)


class Engine:
    """Loads the model once (``start``), then serves any number of concurrent ``run`` calls."""

    def __init__(self, model: Optional[str] = None, device: str = "auto", dtype: str = "auto", output_dir: Optional[str] = None,
                 concurrency: int = 2, limits: Limits = Limits(), allow_pickle: bool = False) -> None:  # fmt: skip
        self.model_option = model
        self.limits = limits
        self.allow_pickle = allow_pickle
        self.concurrency = concurrency
        # UsageError for a path that holds no model or an unreadable recommended.json, worded as the command words it
        self.model, self.settings, self.family = models.model_and_settings(model, allow_pickle)
        self.pag_layers = DEFAULT_LAYERS[self.family or "sdxl"]["pag"]  # the family's default
        self.device_option, self.dtype_option = device, dtype
        self.device, self.dtype = device, dtype
        if output_dir is None:  # the PNGs offered for download; gone when the server stops
            output_dir = tempfile.mkdtemp(prefix="dualguide-ui-")
            atexit.register(shutil.rmtree, output_dir, ignore_errors=True)
        self.output_dir = output_dir
        self.pipe = None
        self.load_error: Optional[str] = None
        self.load_seconds: Optional[float] = None
        self._loaded = threading.Event()
        self._cancel: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._preview_vae = None
        self._runs = 0
        self.active = 0  # runs going now
        self.peak = 0  # most runs going at once so far
        self.last_cancel: Optional[Dict[str, object]] = None  # the step a cancel was asked after, and the step it stopped after
        self._progress: Dict[str, tuple] = {}  # session -> (mode, last finished step)

    # -- loading ---------------------------------------------------------------------------------
    def start(self, background: bool = True) -> "Engine":
        if background:
            threading.Thread(target=self._load, name="dualguide-ui-load", daemon=True).start()
        else:
            self._load()
        return self

    def _load(self) -> None:
        began = time.perf_counter()
        try:
            # as ``dualguide generate`` loads, as text-to-image (a Flux.1 Kontext folder's editing pipeline moved to it)
            pipe = models.load_model(self.model, self.device_option, self.dtype_option, allow_pickle=self.allow_pickle, family=self.family)
            pipe = task_pipeline(pipe, Task())
            pipe.set_progress_bar_config(disable=True)
            if pipe.device.type == "cpu":
                # Runs at once share the cores: oversubscribed OpenMP threads spin and slow every run many times over.
                import torch

                torch.set_num_threads(max(1, torch.get_num_threads() // self.concurrency))
            self.pipe = pipe
            self.device = str(pipe.device.type)
            self.dtype = str(pipe.backbone.dtype).replace("torch.", "")
        except BaseException as error:  # noqa: BLE001 - reported in the page and by the command
            self.load_error = error_message(error)
        finally:
            self.load_seconds = time.perf_counter() - began
            self._loaded.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once loading has finished (successfully or not)."""
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self.pipe is not None

    # -- what the page shows besides images -------------------------------------------------------
    def server_flags(self) -> List[str]:
        """Model options of every command: the ones the server was started with."""
        flags = [] if self.model_option is None else ["--model", self.model_option]
        if self.device_option != "auto":
            flags += ["--device", self.device_option]
        if self.dtype_option != "auto":
            flags += ["--dtype", self.dtype_option]
        if self.allow_pickle:
            flags.append("--allow-pickle")
        for bound in fields(Limits):
            value = getattr(self.limits, bound.name)
            if value != bound.default:
                flags += [flag(bound.name), str(value)]
        return flags

    def plan(self, controls: ui_settings.Controls) -> List[ui_settings.ModeRun]:
        return ui_settings.plan(controls, self.settings, self.server_flags(), self.pag_layers)

    def python_text(self, runs: Sequence[ui_settings.ModeRun]) -> str:
        dtype = None if self.dtype_option == "auto" else self.dtype_option
        device = self.device if self.ready else ("cpu" if self.device_option == "auto" else self.device_option)
        return ui_settings.python_text(runs, self.model, device, dtype, self.allow_pickle)

    # -- cancellation ------------------------------------------------------------------------------
    def cancel(self, session: str) -> bool:
        """Ask the run of ``session`` to stop after its current step; False when it has none."""
        with self._lock:  # with the step check of the run's callback: the run stops after at most one more step
            event = self._cancel.get(session)
            if event is None:
                return False
            self.last_cancel = {"session": session, "requested_after": self._progress.get(session), "stopped_after": None}
            event.set()
        return True

    def running(self, session: str) -> bool:
        with self._lock:
            return session in self._cancel

    # -- running -----------------------------------------------------------------------------------
    def request_pipeline(self):
        """A pipeline object of its own for one run (per-call attributes, scheduler state) on the shared weights."""
        import inspect

        pipe = self.pipe
        cls = type(pipe)
        kwargs = dict(pipe.components)
        kwargs["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config)
        parameters = inspect.signature(cls.__init__).parameters
        if "add_watermarker" in parameters:
            kwargs["add_watermarker"] = getattr(pipe, "watermark", None) is not None
        for name in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
            if name in parameters and name in pipe.config:
                kwargs[name] = pipe.config[name]
        light = cls(**kwargs)
        light.set_progress_bar_config(disable=True)
        for name in ("decode", "_decode"):  # one decode at a time: a float16 VAE is upcast in place while decoding
            method = getattr(light, name, None)
            if method is not None:
                setattr(light, name, self._serialised(method))
        return light

    def _serialised(self, method):
        def call(*args, **kwargs):
            with self._decode_lock:
                return method(*args, **kwargs)

        return call

    def run(self, runs: Sequence[ui_settings.ModeRun], session: str, preview_every: int = 0) -> Iterator[Event]:
        """Run the modes one after the other in a worker thread; yield its events as they come.

        Closing the iterator (the page went away) cancels the run within one step.
        """
        if not self._loaded.wait(timeout=600):
            yield Event("error", message="the model is still loading; try again in a moment")
            return
        if self.pipe is None:
            yield Event("error", message=f"the model could not be loaded: {self.load_error}")
            return
        cancel = threading.Event()
        with self._lock:
            if session in self._cancel:
                yield Event("error", message="this page already has a run going; cancel it or wait for it")
                return
            self._cancel[session] = cancel
            self._progress[session] = (0, 0)
            self._runs += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            folder = os.path.join(self.output_dir, f"run{self._runs:04d}")
        events: "queue.Queue[Event]" = queue.Queue()
        worker = threading.Thread(
            target=self._work, args=(runs, folder, cancel, events, preview_every, session), name="dualguide-ui-run", daemon=True
        )
        worker.start()
        try:
            while True:
                event = events.get()
                yield event
                if event.kind in ("done", "cancelled", "error"):
                    break
        finally:
            cancel.set()  # no-op after the end; stops the worker when the page went away
            worker.join()
            with self._lock:
                self._cancel.pop(session, None)
                self._progress.pop(session, None)
                self.active -= 1

    def _work(self, runs, folder: str, cancel: threading.Event, events: "queue.Queue[Event]", preview_every: int, session: str) -> None:
        try:
            os.makedirs(folder, exist_ok=True)
            for index, run in enumerate(runs):
                self._run_mode(index, run, folder, cancel, events, preview_every, session)
            events.put(Event("done"))
        except Cancelled as stop:
            events.put(Event("cancelled", message=str(stop)))
        except BaseException as error:  # noqa: BLE001 - shown as one line in the page
            events.put(Event("error", message=error_message(error)))

    def _run_mode(self, index: int, run: ui_settings.ModeRun, folder: str, cancel: threading.Event,
                  events: "queue.Queue[Event]", preview_every: int, session: str) -> None:  # fmt: skip
        if cancel.is_set():
            raise Cancelled(f"cancelled before {run.label}")
        pipe = self.request_pipeline()
        if run.softpag_beta is not None:
            from ..pipelines import apply_softpag

            apply_softpag(pipe, run.softpag_beta)
        steps = run.steps
        columns = set(preview_steps(steps, preview_every))
        strip = Strip(run.label, rows_for(run.terms))
        available = [name for name in TENSOR_INPUTS if name in getattr(pipe, "_callback_tensor_inputs", ("latents",))]
        stopped = {"step": None}

        def on_step_end(pipeline, step, timestep, tensors):
            sigma = _sigma(pipeline, timestep)
            with self._lock:
                if cancel.is_set():
                    pipeline._interrupt = True  # the pipeline stops after this step and decodes what it has
                    stopped["step"] = step
                    if self.last_cancel is not None and self.last_cancel["session"] == session:
                        self.last_cancel["stopped_after"] = (index, step + 1)
                else:
                    self._progress[session] = (index, step + 1)
            events.put(Event("progress", index, run.label, step + 1, steps, sigma))
            if step in columns and not cancel.is_set():
                strip.add(step, steps, sigma, self._decode_branches(pipeline, tensors, strip.rows))
                events.put(Event("strip", index, run.label, step + 1, steps, sigma, strip.image()))
            return {}

        events.put(Event("progress", index, run.label, 0, steps))
        output = pipe(
            prompt=run.prompt, generator=generators(run.seeds), num_images_per_prompt=len(run.seeds),
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=available, **run.kwargs,
        )  # fmt: skip
        if stopped["step"] is not None or cancel.is_set():
            done = stopped["step"] + 1 if stopped["step"] is not None else 0
            raise Cancelled(f"cancelled {run.label} after step {done}/{steps}")
        for image, seed in zip(output.images, run.seeds):
            path = os.path.join(folder, f"{index:02d}_{ui_settings.image_file_name(run, seed)}")
            save_png(image, path, ui_settings.metadata(run, self.model, seed))
            events.put(Event("image", index, run.label, steps, steps, image=path))

    def _decode_branches(self, pipe, tensors, rows: Sequence[str]):
        """Decode the first image's x0 prediction of every branch of the step in one VAE call."""
        import torch

        present = [name for name in rows if tensors.get(name) is not None]
        if not present:
            return {}
        latents = torch.cat([tensors[name][:1].float() for name in present])
        with torch.no_grad():
            images = decode_preview(self._vae_for_previews(pipe), latents)
        return dict(zip(present, images))

    def _vae_for_previews(self, pipe):
        """The shared VAE, or a float32 copy of it when it would need upcasting (never touch the shared one's dtype)."""
        import copy

        import torch

        vae = pipe.vae
        if not (vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
            return vae
        with self._lock:
            if self._preview_vae is None:
                self._preview_vae = copy.deepcopy(vae).to(dtype=torch.float32)
            return self._preview_vae


def decode_preview(vae, latents):
    """PIL images of normalised diffusion latents (the pipeline's latent (de)normalisation, SD3's shift included,
    no watermark)."""
    import torch
    from PIL import Image

    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    pixels = vae.decode(latents, return_dict=False)[0]
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def _sigma(pipe, timestep) -> Optional[float]:
    """The noise level of the step's predictions, from the run's denoiser schedule (None when unknown)."""
    import torch

    denoiser = getattr(pipe, "_last_denoiser", None)
    schedule = getattr(denoiser, "schedule", None)
    if schedule is None or timestep is None:
        return None
    try:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1].cpu()
        return float(schedule.t_to_sigma(t)[0])
    except Exception:  # noqa: BLE001 - a label only
        return None
