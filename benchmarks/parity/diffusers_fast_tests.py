"""diffusers' own fast tests of Flux, Chroma and SDXL-PAG, run out of tree against diffusers' pipeline and against ours.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/parity/diffusers_fast_tests.py /work/.mirror/huggingface+diffusers/repo \\
        [--files flux/test_pipeline_flux.py ...] [-k EXPR] [--keep]

The first argument is a diffusers checkout (with ``tests/``) or a bare git directory (its ``HEAD`` is archived); the
tests should come from a commit near the installed diffusers, and need diffusers' test dependencies ``parameterized``
and ``requests-mock`` (``pip install parameterized requests-mock``). The ``tests/`` tree is copied into a temporary
folder beside a ``conftest.py`` written here, which

- stands in for the hub: ``CLIPTokenizer`` / ``AutoTokenizer`` / ``AutoConfig`` ``from_pretrained`` of
  ``hf-internal-testing/tiny-random-clip`` and ``tiny-random-t5`` return tokenizers built in code
  (``dualguide.tiny``) and the tiny T5's config (width 32, the tests' ``joint_attention_dim``);
- with ``DUALGUIDE_SWAP=1``, puts the project's pipeline in place of diffusers' in the test module (the test classes'
  ``pipeline_class`` and the module's name for it) and turns the project's guidance terms off
  (``tpg_scale`` defaults to 0 in the swapped class's ``__call__`` and its signature), so the tests see diffusers'
  sampling plus nothing; the class is also set on ``diffusers.pipelines`` under its name, where diffusers'
  ``test_encode_prompt_works_in_isolation`` reads ``encode_prompt``'s source.

Each file runs twice under pytest (diffusers' class, then ours; ``OMP_NUM_THREADS=1``, slow / nightly / accelerator
tests skip themselves as in diffusers' CI) and a table of passed / failed / skipped per side follows, with every test
that passes for diffusers but not for ours. Exits 1 when there is such a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# test file (under tests/pipelines) -> {diffusers' class name: the project's class name}
SWAPS: Dict[str, Dict[str, str]] = {
    "flux/test_pipeline_flux.py": {"FluxPipeline": "FluxTPGPipeline"},
    "flux/test_pipeline_flux_img2img.py": {"FluxImg2ImgPipeline": "FluxTPGImg2ImgPipeline"},
    "flux/test_pipeline_flux_kontext.py": {"FluxKontextPipeline": "FluxKontextTPGPipeline"},
    "chroma/test_pipeline_chroma.py": {"ChromaPipeline": "ChromaTPGPipeline"},
    "pag/test_pag_sdxl.py": {"StableDiffusionXLPAGPipeline": "StableDiffusionXLTPGPipeline"},
}

CONFTEST = '''"""Written by dualguide's benchmarks/parity/diffusers_fast_tests.py: offline stand-ins for the hub's tiny test
models and, with DUALGUIDE_SWAP=1, the project's pipelines in place of diffusers' with the guidance terms off."""

import functools
import inspect
import json
import os

import transformers

SWAPS = json.loads(os.environ["DUALGUIDE_SWAPS"])
SWAP = os.environ.get("DUALGUIDE_SWAP") == "1"
CLIP_REPO, T5_REPO = "hf-internal-testing/tiny-random-clip", "hf-internal-testing/tiny-random-t5"


def tiny_random_t5_config():
    """The hub's tiny-random-t5 config (width 32, 5 layers of 4 heads of 8, feed-forward 37, 8 relative buckets)."""
    return transformers.T5Config(
        vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.1, initializer_factor=0.002, feed_forward_proj="relu",
        is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def stand_in(cls, stand_ins):
    """Patch ``cls.from_pretrained`` so that the repo ids in ``stand_ins`` are built in code."""
    original = cls.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(klass, name, *args, **kwargs):
        if name in stand_ins:
            return stand_ins[name]()
        return original(klass, name, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def _tiny_tokenizer():
    from dualguide.tiny import tiny_tokenizer

    return tiny_tokenizer()


def _tiny_t5_tokenizer():
    from dualguide.tiny import tiny_t5_tokenizer

    return tiny_t5_tokenizer()


stand_in(transformers.CLIPTokenizer, {CLIP_REPO: _tiny_tokenizer})
stand_in(transformers.AutoTokenizer, {CLIP_REPO: _tiny_tokenizer, T5_REPO: _tiny_t5_tokenizer})
stand_in(transformers.AutoConfig, {T5_REPO: tiny_random_t5_config})


def terms_off(cls):
    """``cls.__call__`` with ``tpg_scale`` defaulting to 0 (signature too): every guidance term of ours off."""
    call = cls.__call__
    signature = inspect.signature(call)

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        kwargs.setdefault("tpg_scale", 0.0)
        return call(self, *args, **kwargs)

    parameters = [p.replace(default=0.0) if p.name == "tpg_scale" else p for p in signature.parameters.values()]
    __call__.__signature__ = signature.replace(parameters=parameters)
    cls.__call__ = __call__


def pytest_collection_modifyitems(items):
    if not SWAP:
        return
    import diffusers.pipelines
    import dualguide

    for module in {item.module for item in items}:
        path = module.__file__.replace(os.sep, "/")
        swaps = next((names for file, names in SWAPS.items() if path.endswith("tests/pipelines/" + file)), {})
        for name, ours in swaps.items():
            theirs, mine = getattr(module, name), getattr(dualguide, ours)
            if not getattr(mine, "_dualguide_terms_off", False):
                terms_off(mine)
                mine._dualguide_terms_off = True
            setattr(module, name, mine)
            # test_encode_prompt_works_in_isolation reads encode_prompt's source through diffusers.pipelines.<class name>
            setattr(diffusers.pipelines, ours, mine)
            for value in list(vars(module).values()):
                if isinstance(value, type) and vars(value).get("pipeline_class") is theirs:
                    value.pipeline_class = mine
'''


def extract_tests(source: str, folder: str) -> None:
    """``source``'s ``tests/`` into ``folder``: copied from a checkout, or archived from a bare git directory's HEAD."""
    if os.path.isdir(os.path.join(source, "tests")):
        shutil.copytree(os.path.join(source, "tests"), os.path.join(folder, "tests"))
        return
    archive = subprocess.run(["git", "-C", source, "archive", "HEAD", "tests"], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(folder, filter="data")


def run_file(folder: str, test_file: str, swap: bool, keyword: str) -> Dict[str, str]:
    """``{test id: "passed" | "failed" | "skipped"}`` of one pytest run of ``test_file`` (failures' messages printed)."""
    report = os.path.join(folder, f"report-{'ours' if swap else 'diffusers'}.xml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DUALGUIDE_SWAP": "1" if swap else "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "DUALGUIDE_SWAPS": json.dumps(SWAPS)}  # fmt: skip
    command = [sys.executable, "-m", "pytest", os.path.join("tests", "pipelines", test_file), "-q", "-p", "no:cacheprovider",
               "--rootdir", folder, "--junitxml", report, "-o", "junit_family=xunit1", "--tb=line", "-rf"]  # fmt: skip
    if keyword:
        command += ["-k", keyword]
    subprocess.run(command, cwd=folder, env=env)
    return junit_outcomes(report)


def junit_outcomes(report: str) -> Dict[str, str]:
    """``{"Class::test": "passed" | "failed" | "skipped"}`` of a pytest junit report (empty when pytest wrote none)."""
    outcomes: Dict[str, str] = {}
    if not os.path.exists(report):  # pytest stopped before writing it (its error is printed above)
        return outcomes
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcomes[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    return outcomes


def counts(outcomes: Dict[str, str]) -> str:
    return "/".join(str(sum(1 for o in outcomes.values() if o == kind)) for kind in ("passed", "failed", "skipped"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("diffusers", help="a diffusers checkout or bare git directory")
    parser.add_argument("--files", nargs="+", default=list(SWAPS), choices=list(SWAPS), help="test files under tests/pipelines")
    parser.add_argument("-k", dest="keyword", default="", help="pytest -k expression")
    parser.add_argument("--keep", action="store_true", help="keep the temporary test tree (its path is printed)")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="diffusers-fast-tests-")
    try:
        extract_tests(args.diffusers, folder)
        with open(os.path.join(folder, "conftest.py"), "w", encoding="utf-8") as f:
            f.write(CONFTEST)
        rows: List[Tuple[str, Dict[str, str], Dict[str, str]]] = []
        for test_file in args.files:
            rows.append((test_file, run_file(folder, test_file, False, args.keyword), run_file(folder, test_file, True, args.keyword)))
    finally:
        if args.keep:
            print(f"test tree kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'file':42s} {'diffusers p/f/s':>16s} {'ours p/f/s':>12s}")
    regressions = []
    for test_file, theirs, ours in rows:
        print(f"{test_file:42s} {counts(theirs):>16s} {counts(ours):>12s}")
        regressions += [f"{test_file}::{name}" for name, o in theirs.items() if o == "passed" and ours.get(name) != "passed"]
    print("\npass for diffusers, not for ours:" + ("".join(f"\n  {name}" for name in regressions) or " none"))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
