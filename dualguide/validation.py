"""Argument checks: the one place where user input is validated and normalised.

Every check names the parameter as the user wrote it and states the valid values. Wrong
types raise ``TypeError``; wrong values (out of range, NaN, infinity, wrong shape, wrong
batch) raise ``ValueError``. Numbers may be Python or numpy scalars (anything registered
as ``numbers.Real`` / ``numbers.Integral``, never ``bool``); they come back as Python
``float`` / ``int``, so a numpy scalar gives exactly what the same Python number gives.

The primitives at the top import nothing heavy (``samplers`` and ``dualguide.config`` use
them); ``check_pipeline_call`` at the bottom checks every argument of the SDXL pipeline's
``__call__`` before any encoding or UNet call, and ``checked_call`` applies it.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

INF = math.inf


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------


def describe_range(
    low: float = -INF, high: float = INF, low_open: bool = False, high_open: bool = False, integer: bool = False
) -> str:
    """``"an integer >= 1"``, ``"a finite number in [0, 1]"``, ``"a finite number > 0"``, ..."""
    kind = "an integer" if integer else "a finite number"
    if low == -INF and high == INF:
        return kind
    if high == INF:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if low == -INF:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def is_number(value: Any) -> bool:
    """A Python or numpy real scalar, not a bool."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_bool(value: Any) -> bool:
    """``True``/``False`` or a numpy bool."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def check_number(
    value: Any,
    name: str,
    low: float = -INF,
    high: float = INF,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    allow_inf: bool = False,
):
    """``value`` as a Python ``float`` (``int`` with ``integer``) in the given range, else an error naming ``name``.

    NaN and -inf are always rejected; +inf only with ``allow_inf`` (for documented "no bound"
    sentinels such as ``Interval.sigma_high``). ``optional`` lets ``None`` through unchanged.
    Integer parameters take integers only (``numbers.Integral``, e.g. ``np.int64``); a float
    there, even ``20.0``, is a ``ValueError``.
    """
    if value is None and optional:
        return None
    valid = describe_range(low, high, low_open, high_open, integer)
    if allow_inf:
        valid += " (or inf)"
    if optional:
        valid += " or None"
    if not is_number(value):
        raise TypeError(f"{name} must be {valid}, got {value!r} of type {type(value).__name__}")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be {valid}, got {value!r}")
        number = int(value)
    else:
        number = float(value)
        if math.isnan(number) or number == -INF or (number == INF and not allow_inf):
            raise ValueError(f"{name} must be {valid}, got {number!r}")
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        raise ValueError(f"{name} must be {valid}, got {number!r}")
    return number


def check_bool(value: Any, name: str, optional: bool = False) -> Optional[bool]:
    """``value`` as a Python ``bool`` (numpy bools accepted)."""
    if value is None and optional:
        return None
    if not is_bool(value):
        raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(choices)}; got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_size(value: Any, name: str, factor: int, default: Optional[int] = None) -> int:
    """An image side in pixels: a positive integer multiple of ``factor``; ``None`` gives ``default``."""
    if value is None and default is not None:
        return default
    valid = f"a positive integer multiple of the VAE factor {factor}"
    if not is_number(value):
        raise TypeError(f"{name} must be {valid}, got {value!r} of type {type(value).__name__}")
    if not isinstance(value, numbers.Integral) or value <= 0 or int(value) % factor:
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    return int(value)


def check_pair(value: Any, name: str, low: int = 0, optional: bool = False) -> Optional[Tuple[int, int]]:
    """A pair of integers ``>= low`` (SDXL sizes and crop coordinates) as a tuple of Python ints."""
    if value is None and optional:
        return None
    valid = f"a pair of integers >= {low}{' or None' if optional else ''}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not _is_array(value):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    items = list(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be {valid}, got {len(items)} values: {value!r}")
    return tuple(check_number(v, name, low, integer=True) for v in items)  # type: ignore[return-value]


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__len__")


def check_tensor(
    value: Any,
    name: str,
    shape: Optional[Sequence[Optional[int]]] = None,
    meaning: str = "",
    optional: bool = True,
    finite: bool = True,
):
    """A ``torch.Tensor`` of ``shape`` (``None`` entries match any size) with finite values.

    ``meaning`` describes the expected dims in the message, e.g. ``"(batch, channels, h, w)"``.
    """
    import torch

    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}")
    if shape is not None:
        actual = tuple(value.shape)
        if len(actual) != len(shape) or any(e is not None and e != a for e, a in zip(shape, actual)):
            wanted = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            raise ValueError(f"{name} must have shape {wanted}{' ' + meaning if meaning else ''}, got {actual}")
    if finite and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return value


def check_prompt(value: Any, name: str, optional: bool = True):
    """A string or a non-empty list/tuple of strings; returns it (tuples as lists)."""
    if value is None and optional:
        return None
    valid = f"a string or a non-empty list of strings{' or None' if optional else ''}"
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be {valid}, got an empty list")
    return list(value)


def check_prompt_batch(value: Any, name: str, batch: int, reference: str = "prompt"):
    """A prompt-like argument matching ``batch`` prompts: one string (for every prompt) or ``batch`` strings.

    Returns a string or a list (tuples become lists; a list of one for one prompt becomes its string).
    """
    value = check_prompt(value, name)
    if value is None or isinstance(value, str):
        return value
    if len(value) != batch:
        raise ValueError(
            f"{name} has {len(value)} entries but {reference} has {batch}; give one per prompt or a single string"
        )
    return value if batch > 1 else value[0]


def check_generator(value: Any, name: str, count: int):
    """``None``, a ``torch.Generator``, or a list of ``count`` generators (one per image)."""
    import torch

    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(g, torch.Generator) for g in value):
        if len(value) != count:
            raise ValueError(f"{name} is a list of {len(value)}; give one per image ({count}) or a single one")
        return list(value)
    raise TypeError(f"{name} must be a torch.Generator, a list of {count} generators or None, got {value!r}")


def check_layer_spec(value: Any, name: str):
    """Layer ids as a string (``"d6-d23"``) or a list of strings; ``None`` is an error naming ``name``."""
    if value is None:
        raise ValueError(f"{name} must be layer ids such as 'd6-d23', 'm0' or a list of them, got None")
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be layer ids such as 'd6-d23', 'm0' or a list of them, got {value!r}")
    return value


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
PIPELINE_PAIRS = {  # name -> (lowest value, optional)
    "original_size": (1, True),
    "target_size": (1, True),
    "negative_original_size": (1, True),
    "negative_target_size": (1, True),
    "crops_coords_top_left": (0, False),
    "negative_crops_coords_top_left": (0, False),
}
PIPELINE_BOOLS = {"do_nag": True, "nag_use_l1": True, "return_dict": False, "truncate_long_prompts": False}  # -> optional
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
    """The UNet's text width (``cross_attention_dim``) and pooled width, when the config states them."""
    config = unet.config
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
    factor = pipe.vae_scale_factor
    for name in PIPELINE_SIZES:
        args[name] = check_size(args[name], name, factor, pipe.default_sample_size * factor)
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
        if args.get("prompt_2") is not None:
            raise ValueError("prompt_2 cannot be combined with prompt_embeds; encode it into prompt_embeds")
        if "pooled_prompt_embeds" in args and args["pooled_prompt_embeds"] is None:
            raise ValueError("pooled_prompt_embeds must be given with prompt_embeds (from the same text encoder)")
    batch = embeds.shape[0] if embeds is not None else (1 if isinstance(prompt, str) else len(prompt))
    reference = "prompt" if prompt is not None else "prompt_embeds"
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2", "nag_negative_prompt"):
        if name in args:  # a family with one text encoder has no *_2 prompts
            args[name] = check_prompt_batch(args[name], name, batch, reference)
    if isinstance(args.get("prompt_2"), str) and args["prompt_2"] and batch > 1:
        args["prompt_2"] = [args["prompt_2"]] * batch  # diffusers broadcasts every prompt-like string but this one
    if args["negative_prompt_embeds"] is not None:
        for name in ("negative_prompt", "negative_prompt_2"):
            if args.get(name) is not None:
                raise ValueError(f"{name} cannot be combined with negative_prompt_embeds; give one of them")
        if "negative_pooled_prompt_embeds" in args and args["negative_pooled_prompt_embeds"] is None:
            raise ValueError("negative_pooled_prompt_embeds must be given with negative_prompt_embeds")
    return batch


def _check_tensors(pipe, args: Dict[str, Any], batch: int) -> None:
    """Embeddings against the UNet's widths and the batch; latents; generators; IP-Adapter inputs."""
    text_width, pooled_width = _unet_widths(pipe.unet)
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
    factor = pipe.vae_scale_factor
    shape = (images, pipe.unet.config.in_channels, args["height"] // factor, args["width"] // factor)
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
    projection = getattr(pipe.unet, "encoder_hid_proj", None)
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
    from .layers import parse_layer_ids, resolve_layers

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
                family.resolve(pipe.unet, spec, name)
            else:
                resolve_layers(pipe.unet, spec, name)
        else:
            parse_layer_ids(spec, name)
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
