"""The public Python API: every advertised name resolves, and importing normcli leaves torch unimported."""

import subprocess
import sys


def test_import_is_torch_free_and_names_resolve():
    code = ("import sys, normcli\nassert 'torch' not in sys.modules\n"
            "missing = [n for n in normcli.__all__ if getattr(normcli, n, None) is None]\nassert not missing, missing\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_python_dash_m(run_normcli):
    proc = subprocess.run([sys.executable, "-m", "normcli", "--version"], capture_output=True, text=True)
    import normcli

    assert proc.returncode == 0 and proc.stdout.strip() == f"normcli {normcli.__version__}"
