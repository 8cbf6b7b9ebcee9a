"""torch.compile of the UNet with TPG, PAG and NAG hooks: eager's results, one compiled variant per branch
set, no graph breaks, no recompilation within or across runs; and the command's ``--compile``.

Inductor on this CPU takes minutes per variant for the 70-block tiny SDXL model, so the compiled runs use
the same SDXL layout with one transformer layer per attention (11 blocks: d0-d3, m0, u0-u5).
"""


import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dualguide import GuidedDenoiser, StableDiffusionXLTPGPipeline, TPG, cli
from dualguide.compiled import compile_unet
from dualguide.generation.models import load_model
from dualguide.hooks import installed_count
from dualguide.tiny import tiny_unet_config

# TPG for the first half of the schedule: its rows leave the batch at the third step.
SETTINGS = dict(
    prompt="a red circle", num_inference_steps=3, height=32, width=32, output_type="latent",
    guidance_scale=5.0, tpg_scale=3.0, tpg_applied_layers_index="d2-d3,m0,u0-u2", tpg_interval=(0.0, 0.5),
    pag_scale=2.0, pag_applied_layers_index="m0", do_nag=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def shallow_pipe(components):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny_unet_config(), "transformer_layers_per_block": 1}).eval()
    pipe = StableDiffusionXLTPGPipeline(**{**components, "unet": unet}, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def run(pipe, seed):
    branch_sets = []
    with torch.no_grad():
        images = pipe(generator=torch.Generator().manual_seed(seed), callback_on_step_end=_record(branch_sets), **SETTINGS).images
    return images, branch_sets


def _record(branch_sets):
    def callback(pipe, step, timestep, tensors):
        branch_sets.append(pipe._last_denoiser.last_branches)
        return {}

    return callback


def test_compiled_unet_equals_eager_with_one_variant_per_branch_set(shallow_pipe, fresh_dynamo):
    eager = {seed: run(shallow_pipe, seed) for seed in (0, 1)}
    branch_sets = eager[0][1]
    assert branch_sets[0] == ("uncond", "cond", "tpg", "pag") and branch_sets[-1] == ("uncond", "cond", "pag")
    unet = shallow_pipe.unet
    try:
        shallow_pipe.unet = compile_unet(unet)
        compiled, _ = run(shallow_pipe, 0)
        assert (compiled - eager[0][0]).abs().max() <= 1e-3
        assert counters["stats"]["unique_graphs"] == len(set(branch_sets))  # one graph per branch set
        assert not counters["graph_break"]
        with torch._dynamo.config.patch(error_on_recompile=True):  # a new run, new permutations: nothing recompiles
            again, _ = run(shallow_pipe, 1)
        assert (again - eager[1][0]).abs().max() <= 1e-3
    finally:
        shallow_pipe.unet = unet


def test_a_unet_compiled_by_the_user_gets_resident_hooks(shallow_pipe):
    compiled = torch.compile(shallow_pipe.unet)  # lazy: nothing is traced here
    denoiser = GuidedDenoiser(compiled, shallow_pipe.scheduler, tpg=TPG(3.0, layers="d0-d1"))
    with denoiser.hooks():
        pass
    blocks = [m for m in shallow_pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 11
    assert all(installed_count(b) and installed_count(b.attn1) and installed_count(b.attn2) for b in blocks)


def test_compile_flag_reaches_the_loader_in_batch(tmp_path, model_folder, loads):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert cli.main(["batch", str(prompts), "--model", model_folder, "--out", str(tmp_path / "out"), "--compile"]) == 1
    assert loads and loads[0].compile


def test_compile_is_a_command_option_not_a_line_setting(tmp_path, loads, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "compile": true}\n')
    assert cli.main(["batch", str(prompts), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'compile'" in capsys.readouterr().err and loads == []


def test_load_with_compile_gives_a_compiled_unet_with_resident_hooks(model_folder):
    pipe = load_model(model_folder, device="cpu", dtype="auto", compile=True)
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    block = pipe.unet._orig_mod.mid_block.attentions[0].transformer_blocks[0]
    assert installed_count(block) == 1 and installed_count(block.attn1) == 1 and installed_count(block.attn2) == 1
