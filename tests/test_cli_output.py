"""What the command line prints, as a user meets it: -q/-v, progress in logs and in a terminal, tables that fit
80 and 200 columns, grouped findings, the sparkline's bins, layer order, help's metavars, defaults and panels
(issue: a command line that feels like the best typer/rich tools)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, STAGE_LINE, error_line, normcli_executable

COMMANDS = ("inspect", "scan", "swap", "fuse-export", "parity", "recalibrate")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
RESNET = ROOT / "samples" / "resnet_tiny.pt"
UNHEALTHY = ROOT / "samples" / "unhealthy.pt"
ARCH = f"{ROOT / 'samples' / 'models.py'}:resnet_tiny"


def run(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """The installed normcli in a subprocess, stdout and stderr piped (as in a CI log)."""
    full = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    full.update(env or {})
    return subprocess.run([*normcli_executable(), *map(str, args)], capture_output=True, text=True, env=full,
                          cwd=ROOT, timeout=300, **kwargs)


def run_in_pty(*args, columns: int = 80, stdout_pipe: bool = False, timeout: float = 300):
    """The installed normcli with stderr (and stdout, unless ``stdout_pipe``) on a pseudo-terminal of
    ``columns`` columns; returns (exit code, what the terminal received, stdout if piped)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "CI")}
    env.update({"TERM": "xterm-256color", "COLUMNS": str(columns)})
    proc = subprocess.Popen([*normcli_executable(), *map(str, args)], stdin=slave,
                            stdout=subprocess.PIPE if stdout_pipe else slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # the last holder of the terminal closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode() if stdout_pipe else ""
    code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode("utf-8", "replace"), out


def screen_lines(raw: str) -> list[str]:
    """Lines as the terminal shows them: escapes removed, carriage returns resolved to the last overwrite."""
    lines = []
    for line in ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
        lines.append(line.split("\r")[-1])
    return lines


def save_norms(path: Path, names, channels: int = 4, stale: bool = True, seed: int = 0) -> Path:
    """A state dict of BatchNorm buffers under ``names`` (stale: the initial statistics, never updated)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        sd[f"{name}.weight"] = torch.rand(channels, generator=g, dtype=torch.float64).float() + 0.5
        sd[f"{name}.bias"] = torch.zeros(channels)
        sd[f"{name}.running_mean"] = torch.zeros(channels) if stale else torch.randn(channels, generator=g)
        sd[f"{name}.running_var"] = torch.ones(channels) if stale else torch.rand(channels, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0 if stale else 10)
    torch.save(sd, path)
    return path


def table_lines(stdout: str, first_column: str = "layer") -> list[str]:
    """The header and rows of the first table in ``stdout`` (until the first line that is not a row)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_column + " "))
    return lines[start:]


# ------------------------------------------------------------------------------------------------- help

def _click_commands():
    import typer

    from normcli.cli import app

    group = typer.main.get_command(app)
    for name in COMMANDS:
        command = group.commands[name]
        ctx = command.make_context(name, ["--help"], resilient_parsing=True)
        yield name, command, command.get_params(ctx)


def test_every_option_has_a_panel_a_metavar_and_a_shown_default():
    from normcli.cli.help import HELP_PANEL, PANELS

    seen_panels = set()
    for name, _, params in _click_commands():
        for p in params:
            if p.param_type_name != "option":
                continue
            panel = p.rich_help_panel
            assert panel in (*PANELS, HELP_PANEL), (name, p.name, panel)
            seen_panels.add(panel)
            if not p.is_flag:
                assert p.metavar and not p.metavar.startswith("<"), (name, p.name)
                if not p.required:
                    shown = p.show_default or "default" in (p.help or "").lower()
                    assert shown, f"{name} {p.opts[0]} shows no default"
    assert seen_panels == {*PANELS, HELP_PANEL}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_metavars_defaults_panels_and_quiet_verbose(command):
    done = run(command, "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    text = done.stdout
    # Typer's raw type names and braces never reach the user
    assert not re.search(r"<(str|int|float|bool|list\[[a-z]+\]|path)>", text), text
    assert not re.search(r"\{[a-z_.]+(\.\.\.)?\}", text), text
    assert f"Usage: normcli {command} [OPTIONS] " in text
    for flag in ("--quiet", "-q", "--verbose", "-v"):
        assert re.search(rf"(^|\s){re.escape(flag)}(\s|$)", text, re.M), flag
    assert "[default:" in text or "(default" in text
    panels = set(re.findall(r"╭─ (\w+) ─", text))
    assert panels >= {"Output", "Help"} and panels <= {"Arguments", "Input", "Model", "Output", "Checks",
                                                        "Safety", "Help"}, panels


def test_inspect_help_shows_the_checks_panel_with_its_defaults():
    text = run("inspect", "-h", env={"COLUMNS": "200"}).stdout
    checks = text.split("╭─ Checks ─", 1)[1].split("╰", 1)[0]
    assert "--fail-on" in checks and "[default: error]" in checks
    assert "--eps" in checks and "[default: 1e-05]" in checks
    assert "Usage: normcli inspect [OPTIONS] PATH..." in text


def test_swap_messages_spell_options_as_the_command_line_does(tmp_path):
    done = run("swap", RESNET, "--to", "mabn", "--B", "3", "--real-B", "7", "-o", tmp_path / "o.pt", "--arch", ARCH)
    line = error_line(done.stderr)
    assert done.returncode == 2 and "--real-B must be a positive multiple of --B" in line
    assert "real_B" not in line and "B=" not in line
    done = run("swap", RESNET, "--to", "mabn", "--learnable-eps", "-o", tmp_path / "o.pt", "--arch", ARCH)
    assert done.returncode == 2 and "--learnable-eps" in done.stderr and "learnable_eps" not in done.stderr


# --------------------------------------------------------------------------------------- quiet / verbose

def test_quiet_keeps_the_result_and_the_error_only():
    done = run("inspect", "-q", UNHEALTHY)
    assert done.returncode == 1
    assert "bn_stale" in done.stdout and "stale-stats" in done.stdout
    assert done.stderr.strip().splitlines() == [error_line(done.stderr)]


def test_quiet_and_verbose_together_is_a_usage_error():
    done = run("inspect", "-q", "-v", RESNET)
    assert done.returncode == 2 and "--quiet and --verbose" in error_line(done.stderr)


def test_verbose_prints_each_stage_with_its_timing():
    done = run("inspect", "-v", RESNET)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(STAGE_LINE.match(line) for line in lines), done.stderr
    assert any(re.search(r"reading .*resnet_tiny\.pt: done in \d+\.\d\ds$", line) for line in lines)
    assert lines[-1].endswith("finished")
    assert "11 norm layers" in done.stdout


def test_swap_logs_its_stages_by_default_and_nothing_under_quiet(tmp_path):
    loud = run("swap", RESNET, "--to", "frn", "-o", tmp_path / "a.pt", "--arch", ARCH)
    assert loud.returncode == 0, loud.stderr
    stages = [line for line in loud.stderr.splitlines() if STAGE_LINE.match(line)]
    assert [re.sub(r"^\[swap \d+\.\ds\] ", "", s) for s in stages] == [
        "swapping BatchNorm for frn", f"writing {tmp_path / 'a.pt'}"]
    seconds = [float(re.match(r"\[swap (\d+\.\d)s\]", s).group(1)) for s in stages]
    assert seconds == sorted(seconds)
    quiet = run("swap", RESNET, "--to", "frn", "-o", tmp_path / "b.pt", "--arch", ARCH, "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and "wrote" in quiet.stdout


@pytest.mark.slow
def test_recalibrate_quiet_says_nothing_on_stderr(tmp_path):
    done = run("recalibrate", RESNET, "--arch", "samples.models:resnet_tiny", "--data",
               "examples/calibration_data.py:synthetic_images", "-o", tmp_path / "r.pt", "-q", "--batches", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "recalibrated norm layers" in done.stdout


# -------------------------------------------------------------------------------------------- progress

@pytest.mark.slow
def test_piped_progress_prints_each_stage_when_it_starts(tmp_path):
    """Each stage's line reaches the log while the command is still working, not all at the end."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen([*normcli_executable(), "fuse-export", str(RESNET), "-o", str(tmp_path / "m.onnx"),
                             "--arch", ARCH, "--input-shape", "1,3,32,32"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = []
    running_when_seen = {}
    for line in proc.stderr:
        seen.append(line.rstrip("\n"))
        running_when_seen[line.strip()] = proc.poll() is None
    proc.wait(timeout=300)
    assert proc.returncode == 0, seen
    export = next(line for line in seen if "exporting with the dynamo exporter" in line)
    assert STAGE_LINE.match(export) and running_when_seen[export.strip()]
    stages = [line for line in seen if STAGE_LINE.match(line)]
    assert [re.sub(r"^\[fuse-export \d+\.\ds\] ", "", s) for s in stages][:3] == [
        "folding weight normalization and BatchNorm", "checking the folded model in torch",
        "exporting with the dynamo exporter"]
    assert f"wrote {tmp_path / 'm.onnx'}" in proc.stdout.read()


@pytest.mark.slow
def test_terminal_progress_is_a_live_line_with_the_stage_and_elapsed_time(tmp_path):
    code, screen, stdout = run_in_pty("fuse-export", RESNET, "-o", tmp_path / "m.onnx", "--arch", ARCH,
                                      "--input-shape", "1,3,32,32", stdout_pipe=True)
    assert code == 0, screen
    text = ANSI.sub("", screen)
    assert re.search(r"fuse-export: exporting with the dynamo exporter\s+\d+\.\ds", text), text[-2000:]
    assert "(total " in text
    assert not re.search(r"^\[fuse-export \d", text, re.M)  # no log lines in a terminal
    # the live line is gone at the end: the last thing on the terminal is not a progress frame
    assert "fuse-export:" not in screen_lines(screen)[-1]
    assert "wrote" in stdout


# ---------------------------------------------------------------------------------------------- tables

@pytest.mark.parametrize("width", [80, 200])
def test_piped_inspect_fits_the_width_one_line_per_layer_no_trailing_padding(width):
    done = run("inspect", UNHEALTHY, env={"COLUMNS": str(width)})
    assert done.returncode == 1
    rows = table_lines(done.stdout)
    header, body = rows[0], rows[1:9]
    assert len(header) <= width and all(len(line) <= width for line in body)
    # every layer is one whole row: its name first, its finding code on the same line
    for line, (name, code) in zip(body, [("bn_healthy", "ok"), ("bn_stale", "stale-stats"), ("bn_nan", "non-finite"),
                                         ("bn_negative_var", "negative-var"), ("bn_tiny_var", "tiny-var"),
                                         ("bn_dead", "dead-channels"), ("bn_fp16_overflow", "fp16-overflow"),
                                         ("bn_mixed_tracking", "mixed-tracking")]):
        assert line.split()[0] == name and line.split()[-1] == code
    assert not any(line != line.rstrip() for line in done.stdout.splitlines())
    if width == 200:
        assert header.split() == ["layer", "kind", "C", "tracked", "running_mean", "running_var", "var", "per",
                                  "channel", "weight", "bias", "findings"]
        assert "left out" not in done.stderr
    else:
        assert "bias" not in header.split() and "findings" in header.split()
        assert re.search(r"column\(s\) left out to fit 80 columns: .*bias", done.stderr)


def _long_names(n: int = 4) -> list[str]:
    return [f"backbone.encoder.stages.{i}.residual_blocks_with_a_long_descriptive_name.block{i}.norm{i}"
            for i in range(n)]


def test_piped_output_never_cuts_a_name(tmp_path):
    path = save_norms(tmp_path / "long.pt", _long_names(), stale=False)
    done = run("inspect", path, env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    for name in _long_names():
        assert re.search(rf"^{re.escape(name)}\s", done.stdout, re.M), name
    assert "…" not in "".join(table_lines(done.stdout))
    assert not any(line != line.rstrip() for line in done.stdout.splitlines())


def test_terminal_table_fits_80_columns_names_shortened_from_the_middle(tmp_path):
    path = save_norms(tmp_path / "long.pt", _long_names(), stale=False)
    code, screen, _ = run_in_pty("inspect", path, columns=80)
    assert code == 0, screen
    lines = [line.rstrip() for line in screen_lines(screen)]
    rows = [line for line in lines if line.startswith("backbone.")]
    assert len(rows) == len(_long_names())  # one line per layer: nothing wrapped onto a second line
    for i, row in enumerate(rows):
        from rich.cells import cell_len

        assert cell_len(row) <= 80, row
        name = row.split()[0]
        assert "…" in name and name.startswith("backbone.") and name.endswith(f"block{i}.norm{i}"), name


def test_shorten_middle_and_join_names_keep_whole_ends():
    from normcli.cli.tables import join_names, shorten_middle

    name = "layer4.1.downsample.projection.1"
    assert shorten_middle(name, 100) == name
    short = shorten_middle(name, 16)
    assert short == "lay…projection.1"  # whole dotted parts of the end, a short start
    assert join_names(["conv1.bn", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1"], 40) == \
        "conv1.bn, layer1.0.bn1, … and 2 more"
    assert join_names(["a", "b"], None) == "a, b"


def test_fit_table_drops_by_priority_and_says_which():
    from normcli.cli.tables import Column, fit_table

    columns = [Column("name", 1, name=True), Column("keep", 2), Column("first-to-go", 9), Column("second", 5)]
    rows = [["x" * 10, "k" * 20, "f" * 20, "s" * 20]]
    wide = fit_table(columns, rows, 200, terminal=False)
    assert wide.dropped == [] and len(wide.lines) == 2
    narrow = fit_table(columns, rows, 60, terminal=False)
    assert narrow.dropped == ["first-to-go"]
    narrower = fit_table(columns, rows, 40, terminal=False)
    assert narrower.dropped == ["first-to-go", "second"]
    assert all(line.cell_len <= 40 for line in narrower.lines)


# ---------------------------------------------------------------------------------- grouping, sparkline

STALE_NAMES = ["conv1.bn", *[f"layer{s}.{b}.bn{k}" for s in (1, 2, 3) for b in (0, 1) for k in (1, 2)]]


def test_repeated_findings_are_grouped_and_the_per_layer_view_keeps_them_all(tmp_path):
    path = save_norms(tmp_path / "stale.pt", STALE_NAMES)
    assert len(STALE_NAMES) == 13
    done = run("inspect", path, env={"COLUMNS": "100"})
    assert done.returncode == 1
    grouped = [line for line in done.stdout.splitlines() if "stale-stats in 13 layers:" in line]
    assert len(grouped) == 1 and grouped[0].startswith("error") and "conv1.bn, layer1.0.bn1" in grouped[0]
    assert re.search(r"… and \d+ more$", grouped[0]) and len(grouped[0]) <= 100
    # the table still has every layer with its code, and -v lists each finding on its own line
    rows = table_lines(done.stdout)[1:14]
    assert [r.split()[0] for r in rows] == STALE_NAMES and all(r.endswith("stale-stats") for r in rows)
    verbose = run("inspect", path, "-v")
    each = [line for line in verbose.stdout.splitlines() if re.match(r"error\s+\S+ stale-stats:", line)]
    assert [line.split()[1] for line in each] == STALE_NAMES


def test_sparkline_one_character_per_channel_then_bins():
    from normcli.cli.inspect import sparkline

    assert len(sparkline(np.linspace(1, 2, 8), 50)) == 8
    assert len(sparkline(np.linspace(1, 2, 300), 50)) == 50
    assert sparkline(np.array([1.0, np.nan, 2.0]), 10)[1] == "!"


def test_inspect_bins_a_wide_layer_and_says_so(tmp_path):
    import torch

    sd = {}
    for name, c in (("narrow", 8), ("wide", 300)):
        sd.update({f"{name}.weight": torch.ones(c), f"{name}.bias": torch.zeros(c),
                   f"{name}.running_mean": torch.linspace(-1, 1, c), f"{name}.running_var": torch.linspace(0.5, 2, c),
                   f"{name}.num_batches_tracked": torch.tensor(5)})
    torch.save(sd, tmp_path / "wide.pt")
    done = run("inspect", tmp_path / "wide.pt", env={"COLUMNS": "160"})
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in table_lines(done.stdout)[1:3]}
    spark = {name: "".join(ch for ch in row if ch in "▁▂▃▄▅▆▇█!") for name, row in rows.items()}
    assert len(spark["narrow"]) == 8 and 8 < len(spark["wide"]) < 300
    note = next(line for line in done.stdout.splitlines() if line.startswith("var per channel:"))
    assert f"up to {len(spark['wide'])}" in note and "binned" in note and "1 layer(s)" in note
    assert all(len(line) <= 160 for line in table_lines(done.stdout)[:3])


# --------------------------------------------------------------------------------------------- order

def test_safetensors_layers_in_natural_order(tmp_path):
    import json

    from safetensors.numpy import save_file

    names = ["layer1.10.bn", "layer1.2.bn", "layer1.1.bn", "layer10.0.bn", "layer2.0.bn"]
    tensors = {}
    for name in names:
        tensors.update({f"{name}.weight": np.ones(4, np.float32), f"{name}.bias": np.zeros(4, np.float32),
                        f"{name}.running_mean": np.zeros(4, np.float32) + 0.1,
                        f"{name}.running_var": np.ones(4, np.float32) * 2,
                        f"{name}.num_batches_tracked": np.array(3, np.int64)})
    save_file(tensors, str(tmp_path / "m.safetensors"))
    done = run("inspect", tmp_path / "m.safetensors", "--json")
    got = [x["name"] for x in json.loads(done.stdout)["layers"]]
    assert got == ["layer1.1.bn", "layer1.2.bn", "layer1.10.bn", "layer2.0.bn", "layer10.0.bn"]


def test_state_dict_layers_in_the_models_order_not_sorted(tmp_path):
    import json

    names = ["stem.bn", "head.bn", "body.10.bn", "body.2.bn"]
    path = save_norms(tmp_path / "m.pt", names, stale=False)
    got = [x["name"] for x in json.loads(run("inspect", path, "--json").stdout)["layers"]]
    assert got == names


def test_natural_key():
    from normcli.naming import natural_key

    assert sorted(["b10", "b2", "a", "b1.10", "b1.9"], key=natural_key) == ["a", "b1.9", "b1.10", "b2", "b10"]


# -------------------------------------------------------------------------------------------- README

def test_every_kind_inspect_can_show_is_documented_in_the_readme():
    from normcli.inspection import NORM_CLASSES
    from normcli.onnx_reader import _NORM_OPS

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Kinds", 1)[1].split("\n## ", 1)[0]
    inferred = {"BatchNorm?", "FrozenBatchNorm?", "FilterResponseNorm?", "MABN2d?", "AffineNorm?", "WeightNorm?"}
    for kind in {*NORM_CLASSES, *_NORM_OPS, "WeightNorm", *inferred}:
        assert f"`{kind}`" in section, kind


def test_swap_groups_the_findings_that_stop_it(tmp_path):
    """A model whose 13 BatchNorms never saw data: one grouped line for the gate's stale-stats, -v each."""
    import torch
    from torch import nn

    torch.save(nn.Sequential(*[nn.BatchNorm2d(4) for _ in range(13)]), tmp_path / "fresh.pt")
    done = run("swap", tmp_path / "fresh.pt", "--to", "mabn", "-o", tmp_path / "o.pt", "--unsafe-load")
    assert done.returncode == 1 and not (tmp_path / "o.pt").exists()
    grouped = [line for line in done.stderr.splitlines() if "stale-stats in 13 layers: 0, 1, 2" in line]
    assert len(grouped) == 1 and grouped[0].endswith("(stops swap)")
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: swap stopped") and lines[-2].startswith("        0: running statistics")
    verbose = run("swap", tmp_path / "fresh.pt", "--to", "mabn", "-o", tmp_path / "o.pt", "--unsafe-load", "-v")
    each = [line for line in verbose.stderr.splitlines() if re.match(r"error\s+\d+ stale-stats:", line)]
    assert len(each) == 13
