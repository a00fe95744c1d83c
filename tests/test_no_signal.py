"""The process's exit status is never a signal, on any input: every case of the hostile suite
(tests/hostile_corpus.py: zip, JSON, pickle, tensor records, sized opcode bombs, bypass payloads, sharded
indexes and DCP directories) through inspect, scan, swap and fuse-export. Each run ends with exit 1 or 2 and
one ``error:`` line as its last stderr line (never ``error: unexpected``, never a traceback), and no payload
ran; scan may also answer ``safe`` (exit 0) for a file that holds no pickle code, such as a JSON bomb.

Each run is its own process: forked from a driver that has already imported normcli's CLI and torch (swap
and fuse-export import torch, seconds each) and that calls the installed console entry point
(``normcli.cli:main``) in the child; the driver reads each child's exit status with waitpid, so a death by
signal shows as it would from the shell. One case of every kind also runs through the installed ``normcli``
command itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hostile_corpus
from tests.conftest import ROOT, normcli_executable

ARCH = "samples/models.py:resnet_tiny"
SIZE = 1_000_000  # the sized pickles at 1 MB here; benchmarks/bench_hostile_suite.py runs them at 10 MB

_DRIVER = r"""
import json, os, sys
import torch  # noqa: F401  (loaded once, before the forks)
from normcli.cli import main

jobs = json.load(open(sys.argv[1]))
results = []
for i, argv in enumerate(jobs):
    out, err = f"{sys.argv[2]}/{i}.out", f"{sys.argv[2]}/{i}.err"
    pid = os.fork()
    if pid == 0:
        o = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); e = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(o, 1); os.dup2(e, 2)
        code = 0
        try:
            main(argv)
        except SystemExit as x:
            code = x.code if isinstance(x.code, int) else 1
        except BaseException:
            import traceback; traceback.print_exc(); code = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                    "err": open(err, errors="replace").read()})
json.dump(results, open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    d = tmp_path_factory.mktemp("hostile-corpus")
    return d, hostile_corpus.build(d, SIZE)


def _check(name: str, command: str, signal: int, code, err: str) -> str | None:
    """What is wrong with one run, or None."""
    lines = err.strip().splitlines()
    if signal:
        return f"{command} {name}: killed by signal {signal}"
    if code == 0 and command == "scan":
        return None  # a verdict, not a refusal: a JSON bomb or a malformed header holds no code to run
    if code not in (1, 2):
        return f"{command} {name}: exit {code}"
    if "Traceback" in err or not lines or not lines[-1].startswith("error: ") \
            or lines[-1].startswith("error: unexpected"):
        return f"{command} {name}: stderr {err.strip()[-300:]!r}"
    return None


@pytest.mark.slow
def test_no_hostile_case_ends_any_command_by_a_signal(corpus, tmp_path):
    base, cases = corpus
    assert len(cases) >= 80 and {n.split("/")[0] for n in cases} >= {"zip", "json", "pickle", "bypass", "shards"}
    problems = []
    # the installed command itself, one process each, for one case of every kind
    firsts = {}
    for name in cases:
        firsts.setdefault(name.split("/")[0], name)
    for name in firsts.values():
        for command in ("inspect", "scan"):
            proc = subprocess.run([*normcli_executable(), command, str(cases[name])], capture_output=True,
                                  text=True, cwd=ROOT, timeout=120)
            signal = -proc.returncode if proc.returncode < 0 else 0
            problem = _check(name, command, signal, proc.returncode if proc.returncode >= 0 else None, proc.stderr)
            if problem:
                problems.append(problem)
    # every case and command: forked per run from a driver that has torch loaded
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    jobs, labels = [], []
    for name, path in cases.items():
        jobs.append(["inspect", str(path)])
        jobs.append(["scan", str(path)])
        labels += [("inspect", name), ("scan", name)]
        jobs.append(["swap", str(path), "--to", "frn", "--arch", ARCH, "-o", str(out_dir / "o.pt")])
        jobs.append(["fuse-export", str(path), "--arch", ARCH, "--input-shape", "1,3,32,32", "-o",
                     str(out_dir / "o.onnx")])
        labels += [("swap", name), ("fuse-export", name)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "logs").mkdir()
    driver = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "jobs.json"), str(tmp_path / "logs"),
                             str(tmp_path / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))})
    assert driver.returncode == 0, driver.stderr[-2000:]
    for (command, name), r in zip(labels, json.loads((tmp_path / "results.json").read_text())):
        problem = _check(name, command, r["signal"], r["code"], r["err"])
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)
    assert list(out_dir.iterdir()) == []                  # nothing written from a hostile file
    assert not (base / "bypass-ran").exists()             # no payload ran
