"""`sslam --help` / `--version`: defaults shown as written, a readable width, no torch imported."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

COMMANDS = ["tag", "extract", "convert", "pretrain", "finetune", "eval", "stats", "plot", "pack"]

# Texts that only show when `[default: ...]`-style brackets in help strings survive rendering.
EXPECTED = {
    "tag": [
        "[default: ta012/SSLAM_AS2M_Finetuned]",
        "else 10.24]",
        "[default: the window; with --events a quarter of it]",
    ],
    "extract": ["[default: the window]", "[default: 4 on CPU, 32 on GPU]"],
    "eval": ["[default: the checkpoint's"],
    "pretrain": ["[base]", "[eat 400k, sslam 200k]", "[eat 5e-4, sslam 5e-5]", "[auto]"],
    "finetune": ["[default: 5e-5, linear 1e-3]", "[default: 10 % of the steps]"],
    "stats": ["[default: all]"],
}


def run_help(*args: str, columns: int | None = None) -> str:
    """`python -m sslam_cli ARGS` with stdout piped, COLUMNS set or unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    proc = subprocess.run(
        [sys.executable, "-m", "sslam_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {command: run_help(command, "--help") for command in COMMANDS}


@pytest.mark.slow
def test_every_help_shows_its_defaults_and_no_eaten_markup(helps):
    for command, text in helps.items():
        flat = " ".join(text.split())
        for expected in EXPECTED.get(command, []):
            assert expected in flat, (command, expected)
        # A bracketed default read as markup leaves "seconds ." or "Updates ; 0" behind.
        assert not re.search(r"\s[.;,)](\s|$)", text), (command, re.findall(r".{30}\s[.;,)](?:\s|$)", text))
        assert f"Usage: sslam {command}" in text


def test_help_width_follows_columns_and_is_wide_when_piped():
    narrow = run_help("pretrain", "--help", columns=80)
    lines = narrow.splitlines()
    assert max(map(len, lines)) <= 80
    # Descriptions start by column 40 and use the rest of the line, not a 20-character strip.
    start = lines.index(next(line for line in lines if "--out" in line))
    assert lines[start].index("Run folder") <= 40
    stop_at = next(line for line in lines if "--stop-at" in line)
    assert len(stop_at) - stop_at.index("Save and exit") >= 40
    piped = run_help("pretrain", "--help").splitlines()
    assert 80 < max(map(len, piped)) <= 100
    wide = run_help("tag", "--help", columns=200)
    assert any("Fine-tuned checkpoint" in line and "[default: ta012/SSLAM_AS2M_Finetuned]" in line
               for line in wide.splitlines())  # fmt: skip


def test_version():
    from sslam_core import __version__

    assert run_help("--version") == f"sslam {__version__}\n"


def test_help_imports_no_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import sslam_cli.main\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'h5py') if m in sys.modules]\n"
        "for args in (['--help'], ['tag', '--help'], ['plot', '--help'], ['stats', '--help']):\n"
        "    assert CliRunner().invoke(sslam_cli.main.app, args).exit_code == 0\n"
        "heavy += [m for m in ('torch', 'matplotlib', 'h5py') if m in sys.modules and m not in heavy]\n"
        "print(' '.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported for help: {proc.stdout.strip()}"


def test_heap_setting_lives_in_a_torch_free_module():
    code = "import sys\nfrom sslam_core.runs.process import limit_heap_fragmentation\n"
    code += "limit_heap_fragmentation()\n"
    code += "print('torch' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
