"""diffusers' own modular guider tests, run out of tree with diffusers' ClassifierFreeGuidance and with the project's
guiders in its place (their own terms off, so they must behave as CFG).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/parity/diffusers_guider_tests.py /work/.mirror/huggingface+diffusers/repo \\
        [-k EXPR] [--keep]

The first argument is a diffusers checkout (with ``tests/``) or a bare git directory (its ``HEAD`` is archived); the
tests should come from a commit near the installed diffusers and need its test dependencies (``pip install
parameterized requests-mock``). The ``tests/`` tree is copied into a temporary folder, with

- tiny local layouts in place of the hub repos the tests load (``hf-internal-testing/tiny-sdxl-modular``,
  ``AlanPonnachan/tiny-sd3-modular``): ``dualguide.tiny``'s SDXL (with a ControlNet) and SD3, saved as diffusers
  pipelines in the folder;
- a ``conftest.py`` written here that points the test classes at those layouts, puts the side's guider in place of
  the tests' ``ClassifierFreeGuidance(**kwargs)``: ``cfg`` diffusers' own, ``tpg``
  ``TokenPerturbationGuidance(tpg_scale=0, **kwargs)``, ``nag`` ``NormalizedAttentionGuidance(nag_scale=1, **kwargs)``,
  and keeps every pipeline call's output tensor and guider class;
- SD3's modular tests have no guider test class: one is added, diffusers' ``ModularGuiderTesterMixin`` on diffusers'
  own SD3 test config, and a second with ``negative_prompt`` in its inputs (without one SD3's modular text encoder
  makes no negative embeds, so CFG has no uncond branch and the first fails for diffusers' guider as for ours).

The selected tests (default ``-k "test_guider_cfg or test_controlnet_cfg"``: SDXL text-to-image, image-to-image,
inpainting, ControlNet; SD3 text-to-image) run once per side; a table of passed / failed / skipped per side follows,
then per test the guider classes that ran and the max |output difference| from diffusers' side, call by call. Exits 1
when a test passes with diffusers' guider but not with ours, or a side's guider did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import torch

from diffusers_fast_tests import ROOT, counts, extract_tests, junit_outcomes

SIDES = {"cfg": "ClassifierFreeGuidance", "tpg": "TokenPerturbationGuidance", "nag": "NormalizedAttentionGuidance"}
FILES = [
    "tests/modular_pipelines/stable_diffusion_xl/test_modular_pipeline_stable_diffusion_xl.py",
    "tests/modular_pipelines/stable_diffusion_3/test_dualguide_guider.py",
]
KEYWORD = "test_guider_cfg or test_controlnet_cfg"

SD3_GUIDER_TESTS = '''"""Written by dualguide's benchmarks/parity/diffusers_guider_tests.py: diffusers' guider mixin on diffusers' SD3 config."""

from ..testing_utils import ModularGuiderTesterMixin
from .test_modular_pipeline_stable_diffusion_3 import StableDiffusion3ModularPipelineTesterConfig


class TestStableDiffusion3ModularPipelineGuider(StableDiffusion3ModularPipelineTesterConfig, ModularGuiderTesterMixin):
    pass


class TestStableDiffusion3ModularPipelineGuiderWithNegative(TestStableDiffusion3ModularPipelineGuider):
    """With a negative prompt: SD3's modular text encoder makes no negative embeds without one, so CFG has no
    uncond branch and the test above cannot tell CFG on from off, for diffusers' guider as for ours."""

    def get_dummy_inputs(self, seed=0):
        return {**super().get_dummy_inputs(seed), "negative_prompt": "low quality"}
'''

CONFTEST = '''"""Written by dualguide's benchmarks/parity/diffusers_guider_tests.py: the hub repos replaced by tiny local layouts,
the tests' ClassifierFreeGuidance by the side's guider (DUALGUIDE_GUIDER), every pipeline call's output kept."""

import functools
import json
import os
import sys

import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import ModularPipeline

SIDE = os.environ["DUALGUIDE_GUIDER"]
LAYOUTS = json.loads(os.environ["DUALGUIDE_LAYOUTS"])
RECORD = {"test": None, "outputs": {}, "guiders": {}}


def side_guider(**kwargs):
    """The side's guider where the test builds ClassifierFreeGuidance(**kwargs): the project's, its own terms off."""
    from dualguide.guiders import NormalizedAttentionGuidance, TokenPerturbationGuidance

    if SIDE == "tpg":
        return TokenPerturbationGuidance(tpg_scale=0.0, **kwargs)
    return NormalizedAttentionGuidance(nag_scale=1.0, **kwargs)


def record(call):
    @functools.wraps(call)
    def recorded(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        test = RECORD["test"]
        RECORD["guiders"].setdefault(test, set()).add(type(getattr(self, "guider", None)).__name__)
        if isinstance(out, torch.Tensor):
            RECORD["outputs"].setdefault(test, []).append(out.detach().float().cpu())
        return out

    return recorded


ModularPipeline.__call__ = record(ModularPipeline.__call__)


def pytest_collection_modifyitems(items):
    for module in {item.module for item in items}:
        for value in list(vars(module).values()):
            if isinstance(value, type) and getattr(value, "pretrained_model_name_or_path", None) in LAYOUTS:
                value.pretrained_model_name_or_path = LAYOUTS[value.pretrained_model_name_or_path]
    if SIDE != "cfg":
        for name, module in list(sys.modules.items()):
            if name.startswith("tests.") and getattr(module, "ClassifierFreeGuidance", None) is ClassifierFreeGuidance:
                module.ClassifierFreeGuidance = side_guider


def pytest_runtest_setup(item):
    RECORD["test"] = f"{item.cls.__name__ if item.cls else ''}::{item.name}"


def pytest_sessionfinish(session):
    guiders = {test: sorted(names) for test, names in RECORD["guiders"].items()}
    torch.save({"outputs": RECORD["outputs"], "guiders": guiders}, os.environ["DUALGUIDE_OUTPUTS"])
'''


def save_layouts(folder: str) -> Dict[str, str]:
    """The tiny SDXL (with a ControlNet) and SD3 saved as diffusers pipelines under ``folder``: ``{hub repo: path}``.
    Components the pipelines leave empty are dropped from ``model_index.json`` (a modular pipeline would try to load them)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLControlNetPipeline

    from dualguide.tiny import build_tiny_controlnet, build_tiny_sd3, build_tiny_sdxl

    sdxl = build_tiny_sdxl(seed=0)
    layouts = {
        "hf-internal-testing/tiny-sdxl-modular": StableDiffusionXLControlNetPipeline(**sdxl, controlnet=build_tiny_controlnet(sdxl["unet"]), add_watermarker=False),
        "AlanPonnachan/tiny-sd3-modular": StableDiffusion3Pipeline(**build_tiny_sd3("sd3")),
    }  # fmt: skip
    paths = {}
    for repo, pipeline in layouts.items():
        path = os.path.join(folder, "layouts", repo.replace("/", "--"))
        pipeline.save_pretrained(path)
        index_file = os.path.join(path, "model_index.json")
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        with open(index_file, "w", encoding="utf-8") as f:
            json.dump({name: value for name, value in index.items() if value != [None, None]}, f, indent=2)
        paths[repo] = path
    return paths


def run_side(folder: str, side: str, layouts: Dict[str, str], keyword: str) -> Tuple[Dict[str, str], dict]:
    """``({test: outcome}, {"outputs": {test: [tensor, ...]}, "guiders": {test: [class names]}})`` of one side."""
    report, outputs = os.path.join(folder, f"report-{side}.xml"), os.path.join(folder, f"outputs-{side}.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DUALGUIDE_GUIDER": side, "DUALGUIDE_OUTPUTS": outputs,
           "DUALGUIDE_LAYOUTS": json.dumps(layouts),
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}  # fmt: skip
    command = [sys.executable, "-m", "pytest", *FILES, "-q", "-p", "no:cacheprovider", "--rootdir", folder, "--junitxml", report,
               "-o", "junit_family=xunit1", "--tb=line", "-rf", "-k", keyword]  # fmt: skip
    subprocess.run(command, cwd=folder, env=env)
    recorded = torch.load(outputs) if os.path.exists(outputs) else {"outputs": {}, "guiders": {}}
    return junit_outcomes(report), recorded


def max_difference(theirs: List[torch.Tensor], ours: List[torch.Tensor]) -> str:
    """The max |difference| over the calls' outputs, call by call ("-" without outputs on both sides)."""
    if not theirs or len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
        return "-" if not theirs and not ours else "mismatch"
    return f"{max((a - b).abs().max().item() for a, b in zip(theirs, ours)):.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("diffusers", help="a diffusers checkout or bare git directory")
    parser.add_argument("-k", dest="keyword", default=KEYWORD, help=f"pytest -k expression (default: {KEYWORD!r})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary test tree (its path is printed)")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="diffusers-guider-tests-")
    try:
        extract_tests(args.diffusers, folder)
        with open(os.path.join(folder, "conftest.py"), "w", encoding="utf-8") as f:
            f.write(CONFTEST)
        with open(os.path.join(folder, FILES[1]), "w", encoding="utf-8") as f:
            f.write(SD3_GUIDER_TESTS)
        layouts = save_layouts(folder)
        results = {side: run_side(folder, side, layouts, args.keyword) for side in SIDES}
    finally:
        if args.keep:
            print(f"test tree kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print("\n" + "  ".join(f"{side} ({SIDES[side]}) p/f/s {counts(outcomes)}" for side, (outcomes, _) in results.items()))
    theirs_outcomes, theirs = results["cfg"]
    problems = []
    print(f"\n{'test':70s} {'cfg':>7s} {'tpg':>7s} {'nag':>7s} {'|tpg-cfg|':>10s} {'|nag-cfg|':>10s}  guiders run (tpg side; nag side)")
    for test in sorted(set().union(*(outcomes for outcomes, _ in results.values()))):
        cells = [results[side][0].get(test, "absent") for side in SIDES]
        diffs = [max_difference(theirs["outputs"].get(test, []), results[side][1]["outputs"].get(test, [])) for side in ("tpg", "nag")]
        ran = "; ".join(",".join(results[side][1]["guiders"].get(test, [])) or "-" for side in ("tpg", "nag"))
        print(f"{test:70s} {cells[0]:>7s} {cells[1]:>7s} {cells[2]:>7s} {diffs[0]:>10s} {diffs[1]:>10s}  {ran}")
        for side in ("tpg", "nag"):
            if theirs_outcomes.get(test) == "passed" and results[side][0].get(test) != "passed":
                problems.append(f"{side}: {test} passes with ClassifierFreeGuidance, not with {SIDES[side]}")
            if results[side][0].get(test) == "passed" and SIDES[side] not in results[side][1]["guiders"].get(test, []):
                problems.append(f"{side}: {test} passed without {SIDES[side]} running")
    print("\nproblems:" + ("".join(f"\n  {problem}" for problem in problems) or " none"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
