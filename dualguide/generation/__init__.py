"""The library layer under every front end (the command, the browser explorer, bulk jobs, eval).

- ``errors``    UsageError and the one-line wording of any error
- ``models``    ``--model`` resolved, its recommended settings, the pipeline loaded as every front end loads it
- ``settings``  option values -> pipeline arguments, checked sampler names, per-image seeds and generators, modes
- ``tasks``     img2img / inpainting / ControlNet inputs read from files, the task's pipeline and arguments
- ``limits``    upper bounds on size, steps and image counts, checked before any load
- ``run``       check and load (``prepare``), then a prompt's images (``generate_images``)
- ``images``    atomic PNGs with their settings (signals held while one is written), file names, labelled grids,
                the output-folder check
- ``progress``  one terminal progress bar over a run's images x steps (``StepProgress``)

Nothing here knows argparse, gradio or a run folder's layout. Importing this package does not import torch.
"""

from .errors import UsageError, describe_error, one_line
from .images import check_output_folder, grid_name, image_name, labelled_grid, save_png, slug
from .limits import Limits, check_counts, check_settings
from .models import EMBEDDED, load_model, model_and_settings, recommended_settings, resolve_model
from .run import Prepared, generate_images, prepare
from .settings import SEED_MAX, call_arguments, check_names, check_seeds, compare_modes, generators, image_seed

__all__ = [
    "EMBEDDED", "Limits", "Prepared", "SEED_MAX", "UsageError", "call_arguments", "check_counts", "check_names", "check_output_folder", "check_seeds", "check_settings",
    "compare_modes", "describe_error", "generate_images", "generators", "grid_name", "image_name", "image_seed",
    "labelled_grid", "load_model", "model_and_settings", "one_line", "prepare", "recommended_settings",
    "resolve_model", "save_png", "slug",
]  # fmt: skip
