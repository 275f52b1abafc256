"""The scripts' error reporting: what the user can fix is one line and exit status 2, a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from src.cli import run_cli
from src.config import ConfigError
from src.training.user_errors import TRAINING_INPUT_ERRORS
from tests.conftest import ROOT


def _raise(err: BaseException):
    def main():
        raise err
    return main


def test_an_input_error_is_one_line_and_status_2_and_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(SystemExit) as done:
        run_cli(_raise(ConfigError("t.yaml: unknown key 'lr'")), TRAINING_INPUT_ERRORS)
    assert done.value.code == 2
    assert capsys.readouterr().err.endswith("error: t.yaml: unknown key 'lr'\n")
    with pytest.raises(ValueError, match="shapes do not match"):  # not among the trainers' input errors
        run_cli(_raise(ValueError("shapes do not match")), TRAINING_INPUT_ERRORS)
    with pytest.raises(RuntimeError):
        run_cli(_raise(RuntimeError("CUDA error")))


def test_a_trainer_reports_a_misspelt_config_key_without_a_traceback(tmp_path):
    config = tmp_path / "train.yaml"
    text = (ROOT / "configs" / "stage2_diffusion_train.yaml").read_text()
    config.write_text(text.replace("\nlearning_rate:", "\nlearnin_rate:", 1))
    done = subprocess.run(
        [sys.executable, "stage2_diffusion_trainer.py", "--training_config", str(config), "--model_config",
         "configs/ldm.yaml", "--dataset", "shapes", "--working_directory", str(tmp_path / "work"),
         "--path_to_vae_backbone", str(tmp_path / "vae.safetensors")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "stage2_diffusion_trainer.py: error: " in done.stderr and "closest valid key: 'learning_rate'" in done.stderr
    assert "Traceback" not in done.stderr
