"""The `harness` extra: the runtime runs without hypothesis and psutil; a harness command says what to
install.

A missing package is simulated in a subprocess by a None entry in sys.modules (Python then raises
ModuleNotFoundError on import, as in an install without the extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WITHOUT_EXTRA = "import sys; sys.modules['hypothesis'] = None; sys.modules['psutil'] = None\n"


def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_runtime_module_imports_without_the_extra() -> None:
    code = (
        "import importlib, pkgutil\n"
        "names = []\n"
        "for pkg in ('mind', 'indexer', 'stream', 'workflows', 'cli'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        if not info.name.endswith('__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "            names.append(info.name)\n"
        "print(len(names), 'modules')\n"
    )
    res = run(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[0]) > 40


def test_worker_command_runs_without_the_extra() -> None:
    res = run("from cli.app import main; sys.argv = ['mind', 'worker', '--help']; main()")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--checkpoint" in res.stdout


def test_a_harness_command_names_the_extra_to_install(tmp_path: Path) -> None:
    argv = (
        f"['mind', 'chaos', '--quick', '--run-dir', {str(tmp_path)!r}, '--out', {str(tmp_path / 'c.json')!r}]"
    )
    res = run(f"from cli.app import main; sys.argv = {argv}; main()")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pip install 'mind-stream[harness]'" in res.stderr and "hypothesis" in res.stderr
    assert not (tmp_path / "c.json").exists()
    for bench in ("scale", "soak"):
        res = run(f"from cli.app import main; sys.argv = ['mind', 'bench', {bench!r}]; main()")
        assert res.returncode == 2 and "mind-stream[harness]" in res.stderr, (bench, res.stderr[-2000:])
