"""The twistd plugin is found after a normal install, not only from a source checkout."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_plugin_is_found_after_installing_the_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("agentd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/agentd_plugin.py" in names
    # The plugin directory is part of Twisted's namespace: shipping an __init__.py there
    # (or in twisted/) would shadow Twisted itself.
    assert "twisted/plugins/__init__.py" not in names and "twisted/__init__.py" not in names
    assert "agentd/static/agent-client.js" in names
    assert "agentd/static/openapi.json" in names
    # The VM image installs from the wheel: a package left out is missing on every VM.
    for init in (REPO / "agentd").rglob("__init__.py"):
        assert str(init.relative_to(REPO)) in names

    # A fresh environment that sees the dependencies but not this checkout, not even
    # through PYTHONPATH (pip would take the checkout for an installed agentd).
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        env=clean,
    )
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import agentd, sys; from twisted.scripts.twistd import run;"
            "print(agentd.__file__, file=sys.stderr); sys.argv = ['twistd', '--help']; run()",
        ],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
    )
    assert str(purelib) in probe.stderr, "imported agentd from somewhere else"
    assert re.search(r"^\s+agentd\s", probe.stdout, re.M), probe.stdout
