"""Pickle-based checkpoints are refused unless allowed, and then load with torch.load(weights_only=True): a
checkpoint whose pickle would write a file never writes it."""

import builtins
import pickle

import pytest
import torch

from dualguide import cli
from dualguide.loading import detect_family, load_pipeline


class WritesAFile:
    """Unpickled by a full ``pickle.load``, this opens (creates) ``path``: the stand-in for code in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture
def malicious(tmp_path):
    """``(checkpoint, file its pickle would create)``, for each pickle-based suffix."""
    target = tmp_path / "pwned"
    checkpoints = []
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        path = tmp_path / f"model{suffix}"
        torch.save({"state_dict": {"cond_stage_model.transformer.x": torch.zeros(1)}, "payload": WritesAFile(target)}, path)
        checkpoints.append(path)
    return checkpoints, target


def test_the_command_refuses_a_pickle_checkpoint_in_one_line_before_loading(malicious, tmp_path, loads, capsys):
    checkpoints, target = malicious
    for path in checkpoints:
        assert cli.main(["generate", "p", "--model", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--model {path}: a pickle-based checkpoint can run code" in err and "--allow-pickle" in err
    assert loads == [] and not target.exists()


def test_allowed_it_loads_with_weights_only_so_the_payload_never_runs(malicious, tmp_path, capsys):
    checkpoints, target = malicious
    assert cli.main(["generate", "p", "--model", str(checkpoints[0]), "--allow-pickle", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.load(weights_only=True) refused it" in err and "nothing of it was run" in err
    with pytest.raises(pickle.UnpicklingError):
        load_pipeline(str(checkpoints[1]), allow_pickle=True)
    assert not target.exists()


def test_python_loading_names_allow_pickle(malicious):
    checkpoints, target = malicious
    for path in checkpoints:
        with pytest.raises(ValueError, match="allow_pickle=True"):
            load_pipeline(str(path))
        with pytest.raises(ValueError, match="allow_pickle=True"):
            detect_family(str(path))
    assert not target.exists()


def test_a_plain_pickle_state_dict_is_read_with_weights_only_when_allowed(tmp_path):
    path = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.text_model.x": torch.zeros(1)}}, path)
    assert detect_family(str(path), allow_pickle=True) == "sd"
    legacy = tmp_path / "sdxl.pt"
    torch.save({"conditioner.embedders.1.model.x": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    assert detect_family(str(legacy), allow_pickle=True) == "sdxl"
