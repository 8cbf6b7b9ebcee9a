"""Argument checks: the one place where user input is validated and normalised.

Every check names the parameter as the user wrote it and states the valid values. Wrong
types raise ``TypeError``; wrong values (out of range, NaN, infinity, wrong shape, wrong
batch) raise ``ValueError``. Numbers may be Python or numpy scalars (anything registered
as ``numbers.Real`` / ``numbers.Integral``, never ``bool``); they come back as Python
``float`` / ``int``, so a numpy scalar gives exactly what the same Python number gives.

The primitives live in ``dualguide.checks`` (and its scalar checks in ``samplers.checks``), which
``dualguide.config`` uses too; ``check_pipeline_call`` here checks every argument of the guided
pipelines' ``__call__`` before any encoding or UNet call, and ``checked_call`` applies it.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from .checks import (  # check_number, check_pair, check_size, check_tensor: also the pipelines' and tests' import
    INF, check_bool, check_choice, check_generator, check_layer_spec, check_number, check_pair, check_prompt,
    check_prompt_batch, check_size, check_tensor,
)


# --------------------------------------------------------------------------------------------
# The SDXL pipeline call
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberRule:
    """How one numeric argument is checked (see ``check_number``)."""

    low: float = -INF
    high: float = INF
    low_open: bool = False
    integer: bool = False
    optional: bool = False

    def __call__(self, value: Any, name: str):
        return check_number(
            value, name, self.low, self.high, low_open=self.low_open, integer=self.integer, optional=self.optional
        )


# Every numeric argument of the guided SDXL pipelines' ``__call__`` (``optional``: None means "the
# default"). A rule whose argument a pipeline lacks is skipped; tests/test_validation.py checks that
# every numeric argument of the pipeline has a rule here.
PIPELINE_NUMBERS: Dict[str, NumberRule] = {
    "num_inference_steps": NumberRule(1, integer=True, optional=True),  # None: with timesteps or sigmas
    "num_images_per_prompt": NumberRule(1, integer=True),
    "guidance_scale": NumberRule(0.0),
    "guidance_rescale": NumberRule(0.0, 1.0),
    "eta": NumberRule(0.0),
    "denoising_end": NumberRule(0.0, 1.0, low_open=True, optional=True),
    "tpg_scale": NumberRule(0.0),
    "pag_scale": NumberRule(0.0, optional=True),
    "pag_adaptive_scale": NumberRule(0.0),
    "nag_scale": NumberRule(1.0, optional=True),
    "nag_tau": NumberRule(0.0, low_open=True, optional=True),
    "nag_alpha": NumberRule(0.0, 1.0, optional=True),
    "nag_end": NumberRule(0.0, 1.0, optional=True),
    "sigma_min": NumberRule(0.0, low_open=True, optional=True),
    "sigma_max": NumberRule(0.0, low_open=True, optional=True),
    "max_batch_rows": NumberRule(1, integer=True, optional=True),
    "clip_skip": NumberRule(0, integer=True, optional=True),
}
PIPELINE_SEQUENCES: Dict[str, NumberRule] = {  # lists of numbers: a custom schedule
    "timesteps": NumberRule(0.0),
    "sigmas": NumberRule(0.0),
}
PIPELINE_SIZES = ("height", "width")
# Upper bounds far past any real use (sides: past every image format's limit, JPEG's and WebP's 65535 px; sigmas:
# past the 4096 of zero-terminal-SNR schedules). Beyond them a call failed deep in numpy or torch (allocating the
# schedule or the latents, a scale overflowing float32 inside the UNet) naming no argument, or returned infinite or
# NaN latents. For a list (``sigmas``) its largest value counts.
MAX_SCALE = 1000
MAX_SIGMA = 10_000
PIPELINE_MAXIMA = {
    "num_inference_steps": 10_000, "num_images_per_prompt": 10_000, "height": 2**16, "width": 2**16,
    "guidance_scale": MAX_SCALE, "tpg_scale": MAX_SCALE, "pag_scale": MAX_SCALE, "pag_adaptive_scale": MAX_SCALE, "nag_scale": MAX_SCALE,
    "sigma_max": MAX_SIGMA, "sigmas": MAX_SIGMA,
}  # fmt: skip
PIPELINE_PAIRS = {  # name -> (lowest value, optional)
    "original_size": (1, True),
    "target_size": (1, True),
    "negative_original_size": (1, True),
    "negative_target_size": (1, True),
    "crops_coords_top_left": (0, False),
    "negative_crops_coords_top_left": (0, False),
}
PIPELINE_BOOLS = {  # -> optional
    "do_nag": True, "nag_use_l1": True, "return_dict": False, "truncate_long_prompts": False, "share_prefix": False,
}  # fmt: skip
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_numbers(value: Any, name: str, rule: NumberRule, optional: bool = True):
    """A non-empty list (or 1-D tensor / array) of numbers, each checked by ``rule``; ints stay ints."""
    if value is None and optional:
        return None
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 1:
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of numbers{' or None' if optional else ''}, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty list of numbers, got []")
    checked = [rule(v, name) for v in value]
    return [int(c) if isinstance(v, numbers.Integral) else c for v, c in zip(value, checked)]


def _unet_widths(unet) -> Tuple[Optional[int], Optional[int]]:
    """The backbone's text width (``cross_attention_dim``; SD3: ``joint_attention_dim``) and pooled width, when the
    config states them."""
    config = unet.config
    if config.get("joint_attention_dim") is not None:
        return config["joint_attention_dim"], config.get("pooled_projection_dim")
    width = config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0] if len(set(width)) == 1 else None
    pooled = None
    if config.get("addition_embed_type") == "text_time" and config.get("projection_class_embeddings_input_dim"):
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return width, pooled


def _max_clip_skip(pipe) -> Optional[int]:
    layers = [
        encoder.config.num_hidden_layers
        for encoder in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
        if encoder is not None and hasattr(encoder.config, "num_hidden_layers")
    ]
    return min(layers) - 1 if layers else None


def check_pipeline_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """Check every argument of a guided pipeline call (any family); return them normalised.

    Runs before any encoding or UNet call and changes nothing on ``pipe``. Numbers come back
    as Python numbers, ``height`` / ``width`` filled in, prompt-likes as strings or lists of
    ``batch`` strings, generator lists as lists. Arguments a pipeline lacks are skipped.
    """
    args = dict(args)
    _check_scalars(pipe, args)
    custom = args.get("sigmas") if args.get("sigmas") is not None else args.get("timesteps")
    if args.get("num_inference_steps") is None and custom is not None:  # diffusers: the custom schedule sets it
        args["num_inference_steps"] = max(1, len(custom) - (args.get("sigmas") is not None))
    _check_sampling(pipe, args)
    batch = _check_prompts(pipe, args)
    _check_tensors(pipe, args, batch)
    _check_guidance(pipe, args, batch)
    return args


def _check_scalars(pipe, args: Dict[str, Any]) -> None:
    """Numbers, number lists, pairs, flags, sizes, choices, callbacks."""
    for name, rule in PIPELINE_NUMBERS.items():
        if name in args:
            args[name] = rule(args[name], name)
    for name, rule in PIPELINE_SEQUENCES.items():
        if name in args:
            args[name] = check_numbers(args[name], name, rule)
    for name, (low, optional) in PIPELINE_PAIRS.items():
        if name in args:
            args[name] = check_pair(args[name], name, low, optional)
    for name, optional in PIPELINE_BOOLS.items():
        if name in args:
            args[name] = check_bool(args[name], name, optional)
    factor = getattr(pipe, "size_multiple", pipe.vae_scale_factor)  # Flux packs 2x2 latents: twice the VAE factor
    for name in PIPELINE_SIZES:  # diffusers' default side: the sample size in latents times the VAE factor
        args[name] = check_size(args[name], name, factor, pipe.default_sample_size * pipe.vae_scale_factor)
    for name, top in PIPELINE_MAXIMA.items():
        value = args.get(name)
        largest = max(value) if isinstance(value, list) else value
        if largest is not None and largest > top:
            raise ValueError(f"{name} must be at most {top}, got {largest}")
    if args.get("clip_skip") is not None:
        top = _max_clip_skip(pipe)
        if top is not None and args["clip_skip"] > top:
            raise ValueError(
                f"clip_skip must be an integer in [0, {top}] for these text encoders, got {args['clip_skip']}"
            )
    kwargs = args.get("cross_attention_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"cross_attention_kwargs must be a dict or None, got {type(kwargs).__name__}")
    if kwargs and kwargs.get("scale") is not None:
        scale = check_number(kwargs["scale"], "cross_attention_kwargs['scale']")
        args["cross_attention_kwargs"] = {**kwargs, "scale": scale}
    check_choice(args["output_type"], "output_type", OUTPUT_TYPES)
    if args.get("callback_on_step_end") is not None and not callable(args["callback_on_step_end"]):
        raise TypeError(f"callback_on_step_end must be a callable or None, got {args['callback_on_step_end']!r}")
    inputs = args.get("callback_on_step_end_tensor_inputs", ())
    valid = list(pipe._callback_tensor_inputs)
    if isinstance(inputs, str) or not isinstance(inputs, Iterable):
        raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names from {valid}, got {inputs!r}")
    unknown = [k for k in inputs if k not in valid]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs must be names from {valid}, got {unknown}")


def _check_sampling(pipe, args: Dict[str, Any]) -> None:
    """Sampler, sigma schedule (and its range), custom timesteps / sigmas."""
    import samplers
    from samplers.schedules import check_schedule

    sampler = args["sampler"]
    if isinstance(sampler, str):
        samplers.get(sampler)  # ValueError listing the names
    elif sampler is not None and not callable(sampler):
        raise TypeError(f"sampler must be a name ({', '.join(samplers.names())}) or a callable, got {sampler!r}")
    schedule = args["sigma_schedule"]
    if schedule is not None:
        check_choice(schedule, "sigma_schedule", samplers.SCHEDULE_NAMES)
    custom = [name for name in PIPELINE_SEQUENCES if args.get(name) is not None]
    if len(custom) > 1:
        raise ValueError("give either timesteps or sigmas, not both")
    if args["num_inference_steps"] is None and not custom:
        raise ValueError("num_inference_steps must be an integer >= 1 (None only with timesteps or sigmas)")
    given = [name for name in ("sigma_schedule", "sigma_min", "sigma_max") if args[name] is not None]
    if (sampler is not None or given) and not custom:  # the values first: 0 < sigma_min < sigma_max, ...
        check_schedule(
            schedule or "model", args["num_inference_steps"], args["sigma_min"], args["sigma_max"], pipe.scheduler,
            steps_name="num_inference_steps",
        )  # fmt: skip
    for name in given:  # then whether they would be used: an ignored argument is an error
        if custom:
            raise ValueError(f"give either {custom[0]} or {name}, not both")
        if sampler is None:
            raise ValueError(
                f"{name} applies to k-diffusion samplers: pass sampler= (e.g. 'euler') with it, "
                "or leave it out to follow pipe.scheduler"
            )
    if custom and sampler is None:  # diffusers' loop: the scheduler must take them
        accepted = inspect.signature(pipe.scheduler.set_timesteps).parameters
        if custom[0] not in accepted:
            raise ValueError(
                f"{custom[0]}: {type(pipe.scheduler).__name__}.set_timesteps does not take custom {custom[0]}; "
                "use another scheduler or a k-diffusion sampler (sampler=...)"
            )
    if custom and custom[0] == "timesteps":
        top = pipe.scheduler.config.get("num_train_timesteps")
        if top is not None and max(args["timesteps"]) > top - 1:
            raise ValueError(f"timesteps must lie in [0, {top - 1}], got {max(args['timesteps'])}")


def _check_prompts(pipe, args: Dict[str, Any]) -> int:
    """prompt or prompt_embeds (exactly one); every prompt-like argument against its batch. Returns the batch."""
    prompt = args["prompt"] = check_prompt(args["prompt"], "prompt")
    embeds = args["prompt_embeds"]
    if (prompt is None) == (embeds is None):
        raise ValueError("give either prompt or prompt_embeds (exactly one of them)")
    if embeds is not None:
        check_tensor(embeds, "prompt_embeds", (None, None, None), "(batch, tokens, width)")
        for name in ("prompt_2", "prompt_3"):
            if args.get(name) is not None:
                raise ValueError(f"{name} cannot be combined with prompt_embeds; encode it into prompt_embeds")
        if "pooled_prompt_embeds" in args and args["pooled_prompt_embeds"] is None:
            raise ValueError("pooled_prompt_embeds must be given with prompt_embeds (from the same text encoder)")
    batch = embeds.shape[0] if embeds is not None else (1 if isinstance(prompt, str) else len(prompt))
    reference = "prompt" if prompt is not None else "prompt_embeds"
    for name in ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "nag_negative_prompt"):
        if name in args:  # a family with one text encoder has no *_2 prompts
            args[name] = check_prompt_batch(args[name], name, batch, reference)
    if isinstance(args.get("prompt_2"), str) and args["prompt_2"] and batch > 1:
        args["prompt_2"] = [args["prompt_2"]] * batch  # diffusers broadcasts every prompt-like string but this one
    if args["negative_prompt_embeds"] is not None:
        for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            if args.get(name) is not None:
                raise ValueError(f"{name} cannot be combined with negative_prompt_embeds; give one of them")
        if "negative_pooled_prompt_embeds" in args and args["negative_pooled_prompt_embeds"] is None:
            raise ValueError("negative_pooled_prompt_embeds must be given with negative_prompt_embeds")
    return batch


def _check_tensors(pipe, args: Dict[str, Any], batch: int) -> None:
    """Embeddings against the UNet's widths and the batch; latents; generators; IP-Adapter inputs."""
    text_width, pooled_width = _unet_widths(pipe.backbone)
    text_shape = (batch, None, text_width)
    embeds = check_tensor(args["prompt_embeds"], "prompt_embeds", text_shape, "(batch, tokens, cross_attention_dim)")
    check_tensor(args.get("pooled_prompt_embeds"), "pooled_prompt_embeds", (batch, pooled_width), "(batch, pooled width)")
    negative_shape = tuple(embeds.shape) if embeds is not None else (batch, None, text_width)
    check_tensor(args["negative_prompt_embeds"], "negative_prompt_embeds", negative_shape, "(the shape of prompt_embeds)")
    check_tensor(
        args.get("negative_pooled_prompt_embeds"), "negative_pooled_prompt_embeds", (batch, pooled_width), "(batch, pooled width)"
    )
    images = batch * args["num_images_per_prompt"]
    nag_embeds = check_tensor(
        args["nag_negative_prompt_embeds"], "nag_negative_prompt_embeds", (None, None, text_width),
        "(batch, tokens, cross_attention_dim)",
    )  # fmt: skip
    if nag_embeds is not None and nag_embeds.shape[0] not in (batch, images):
        raise ValueError(
            f"nag_negative_prompt_embeds has batch {nag_embeds.shape[0]}; expected {batch} (one per prompt) "
            f"or {images} (one per image)"
        )
    packed = getattr(pipe, "packed_latents_shape", None)  # Flux takes its latents packed into 2x2 patch tokens
    if packed is not None:
        shape, meaning = packed(images, args["height"], args["width"])
    else:
        factor = pipe.vae_scale_factor
        shape = (images, pipe.backbone.config.in_channels, args["height"] // factor, args["width"] // factor)
        meaning = "(batch * num_images_per_prompt, unet in_channels, height // vae_scale_factor, width // vae_scale_factor)"
    check_tensor(args["latents"], "latents", shape, meaning)
    args["generator"] = check_generator(args["generator"], "generator", images)
    _check_ip_adapter(pipe, args)


def _check_ip_adapter(pipe, args: Dict[str, Any]) -> None:
    """IP-Adapter inputs: one of image / embeds, an adapter loaded, one entry per adapter."""
    given = [name for name in ("ip_adapter_image", "ip_adapter_image_embeds") if args.get(name) is not None]
    if not given:
        return
    if len(given) > 1:
        raise ValueError("give either ip_adapter_image or ip_adapter_image_embeds, not both")
    name = given[0]
    projection = getattr(pipe.backbone, "encoder_hid_proj", None)
    layers = getattr(projection, "image_projection_layers", None)
    if layers is None:
        raise ValueError(f"{name} needs an IP-Adapter: load one first (pipe.load_ip_adapter(...))")
    value = args[name]
    if name == "ip_adapter_image_embeds":
        if not isinstance(value, (list, tuple)):
            raise TypeError(
                f"ip_adapter_image_embeds must be a list of tensors (one per IP-Adapter), got {type(value).__name__}"
            )
        for item in value:
            check_tensor(item, name, optional=False)
            if item.ndim not in (3, 4):
                raise ValueError(f"ip_adapter_image_embeds must hold 3-D or 4-D tensors, got {item.ndim}-D")
    count = len(value) if isinstance(value, (list, tuple)) else 1
    if count != len(layers):
        raise ValueError(f"{name} has {count} entries but {len(layers)} IP-Adapter(s) are loaded; give one per adapter")


def _check_guidance(pipe, args: Dict[str, Any], batch: int) -> None:
    """Layer ids (against this UNet when the term is on), intervals, NAG's end and negative."""
    from .config import as_interval
    from .layers import parse_layer_spec, resolve_layers

    if args["nag_end"] is not None and args["nag_interval"] is not None:
        raise ValueError("give either nag_end or nag_interval, not both")
    nag_defaults = getattr(pipe, "_nag_defaults", None) or {}
    nag_on = args["do_nag"] if args["do_nag"] is not None else bool(nag_defaults.get("do_nag", False))
    if nag_on and args["nag_negative_prompt"] is None and nag_defaults.get("nag_negative_prompt") is not None:
        check_prompt_batch(nag_defaults["nag_negative_prompt"], "nag_negative_prompt (from apply_nag)", batch)
    pag_scale = args["pag_scale"]
    if pag_scale is None:
        pag_scale = 3.0 if getattr(pipe, "_softpag", None) is not None else 0.0
    for prefix, scale in (("tpg", args["tpg_scale"]), ("pag", pag_scale)):
        name = f"{prefix}_applied_layers_index"
        spec = check_layer_spec(args[name], name)
        if scale > 0:  # unknown ids listed with this model's valid ranges (by the pipeline's family adapter)
            family = getattr(pipe, "family", None)
            if family is not None:
                family.resolve(pipe.backbone, spec, name)
            else:
                resolve_layers(pipe.backbone, spec, name)
        else:
            parse_layer_spec(spec, name)
    for name in ("cfg_interval", "tpg_interval", "pag_interval", "nag_interval"):
        as_interval(args[name], name)


# --------------------------------------------------------------------------------------------
# ControlNet arguments
# --------------------------------------------------------------------------------------------


def check_per_net(value: Any, name: str, nets: int, low: float = -INF, high: float = INF):
    """One number for every ControlNet, or a list of ``nets`` numbers (a list of one for one ControlNet)."""
    if isinstance(value, (list, tuple)):
        if len(value) != nets:
            raise ValueError(f"{name} has {len(value)} values for {nets} ControlNet(s); give one per ControlNet or one number")
        return [check_number(v, name, low, high) for v in value]
    return check_number(value, name, low, high)


def control_images_per_net(value: Any, name: str, nets: int) -> list:
    """The control image(s) of each ControlNet: ``value`` itself for one, a list of one entry per ControlNet for several."""
    if nets == 1:
        return [value]
    if not isinstance(value, (list, tuple)) or len(value) != nets:
        given = f"{len(value)} entries" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        raise ValueError(f"{name} must be a list of one control image (or list of images) per ControlNet ({nets}), got {given}")
    return list(value)


def control_batch(value: Any) -> int:
    """How many images one ControlNet's control image holds (a list, or a batched 4-D array / tensor)."""
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", ())
    return shape[0] if len(shape) == 4 else 1


def check_control_guidance(args: Dict[str, Any], nets: int) -> None:
    """``controlnet_conditioning_scale``, ``control_guidance_start`` / ``control_guidance_end`` (in [0, 1],
    each start below its end) and ``guess_mode`` of a call with ``nets`` ControlNets, normalised in ``args``."""
    args["controlnet_conditioning_scale"] = check_per_net(args["controlnet_conditioning_scale"], "controlnet_conditioning_scale", nets)
    start = args["control_guidance_start"] = check_per_net(args["control_guidance_start"], "control_guidance_start", nets, 0.0, 1.0)
    end = args["control_guidance_end"] = check_per_net(args["control_guidance_end"], "control_guidance_end", nets, 0.0, 1.0)
    starts, ends = (v if isinstance(v, list) else [v] * nets for v in (start, end))
    for index, (low, high) in enumerate(zip(starts, ends)):
        if low >= high:
            which = f" (ControlNet {index})" if nets > 1 else ""
            raise ValueError(f"control_guidance_start ({low:g}) must be below control_guidance_end ({high:g}){which}")
    args["guess_mode"] = check_bool(args["guess_mode"], "guess_mode")


def checked_call(check: Callable[[Any, Dict[str, Any]], Dict[str, Any]]):
    """Decorate a method so that ``check(self, arguments)`` sees and normalises all its arguments first.

    The arguments are bound to the signature (defaults filled in), checked, and passed on by
    keyword; nothing of the method runs when the check raises.
    """

    def decorate(method):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            del arguments[next(iter(signature.parameters))]
            return method(self, **check(self, arguments))

        return wrapper

    return decorate
