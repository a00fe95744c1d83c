"""The README's commands are run here, so the docs cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block_after(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```[^\n]*\n(.*?)\n```", README, re.S)
    assert m, f"README has no block after <!-- {marker} -->"
    return m.group(1).strip()


def _examples_script():
    """scripts/update_readme_examples.py, the one place that says how an example block is written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme_examples",
                                                  ROOT / "scripts" / "update_readme_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLES = _examples_script()


def console_examples() -> list[tuple[str, list[str]]]:
    """(command, output lines as the README shows them) for every ``$ normcli ...`` example."""
    return [(m.group("command")[2:], m.group("body").splitlines()) for m in EXAMPLES.examples(README)]


def shell(cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_start_main_job_succeeds():
    cmd = block_after("quick-start")
    assert "normcli inspect samples/" in cmd
    proc = shell(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "norm layers" in proc.stdout


def test_test_command_is_what_ci_runs():
    assert "pytest" in block_after("test-command")
    assert "test-command" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("example", EXAMPLES.examples(README), ids=lambda m: m.group("command")[2:60])
def test_console_examples_are_todays_output(example):
    """Each ``$ normcli`` block is exactly what the command prints now (timings aside), elided lines marked
    as the block's comment asks; scripts/update_readme_examples.py rewrites them."""
    assert EXAMPLES.masked(EXAMPLES.expected_block(example)) == EXAMPLES.masked(example.group(0))


def test_elision_keeps_head_and_tail_and_marks_the_rest():
    lines = [f"line {i}" for i in range(10)]
    assert EXAMPLES.elide(lines, " head=2 tail=3 ") == ["line 0", "line 1", "… (5 lines elided)", "line 7",
                                                        "line 8", "line 9"]
    assert EXAMPLES.elide(lines, None) == lines
    assert EXAMPLES.masked("[swap 12.3s] writing x in 2.6 s (42.6 samples/s)") == \
        "[swap #s] writing x in # s (# samples/s)"


def test_demo_table_is_the_committed_run():
    """The README's small-batch table is the one examples/small_batch.py wrote, not retyped numbers."""
    committed = (ROOT / "examples" / "small_batch.md").read_text()
    rows = [line for line in README.splitlines() if line.startswith("| ") and ("+ ReLU |" in line or "+ TLU |" in line)]
    assert len(rows) == 6
    for row in rows:
        assert any(line.startswith(row.rstrip()[:-1]) for line in committed.splitlines()), row
    assert (ROOT / "examples" / "small_batch.png").stat().st_size > 1000


def test_swap_rebuild_recipe_runs_as_written_after_a_swap_with_include(tmp_path):
    """The README's swap command (with --include), then its rebuild recipe, verbatim but for the file name."""
    import torch

    command = next(c for c, _ in console_examples() if c.startswith("normcli swap "))
    recipe = block_after("swap-rebuild")
    assert "--include" in command and "/tmp/swapped_frn.pt" in command and "/tmp/swapped_frn.pt" in recipe
    target = str(tmp_path / "swapped_frn.pt")
    proc = shell(command.replace("/tmp/swapped_frn.pt", target))
    assert proc.returncode == 0, proc.stderr[-2000:]
    namespace: dict = {}
    exec(compile(recipe.replace("/tmp/swapped_frn.pt", target), "README.md", "exec"), namespace)
    model = namespace["model"]
    # the rebuilt model is the swapped one: the same layers replaced, and the same numbers
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["layer1.0.bn1"] == "FilterResponseNorm2d" and kinds["layer2.0.bn1"] == "BatchNorm2d"
    from normcli.loading import load_model

    loaded = load_model(target, arch="samples/models.py:resnet_tiny")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), loaded.model.eval()(x))
