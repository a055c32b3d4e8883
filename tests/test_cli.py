"""The `moe-gato` command line, run as a real subprocess."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_gato.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_tokenize_prints_a_real_timestep():
    out = _cli("tokenize", "--task", "babyai/BabyAI-GoToRedBall-v0", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "separator" in out.stdout and "'go to the red ball'" in out.stdout


def test_bad_arguments_are_clear_errors():
    out = _cli("tokenize", "--task", "babyai/BabyAI-NoSuchLevel-v0")
    assert out.returncode == 2
    assert "unknown control task" in out.stderr and "Traceback" not in out.stderr
    out = _cli("no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr
