"""The torchax tests (``tests/torchax_cases.py``), in a pytest process of their own.

``import torchax`` renames PyTorch's PrivateUse1 backend to "jax" and registers
a device module for it, for the rest of the process; torch.compile and
``torch.library.opcheck`` then fail in other tests ("PyTorch is not linked with
support for jax devices", torchax's ``set_rng_state`` signature). So this suite
never imports torchax itself: it runs the cases in a child pytest and reports
its outcome. Skipped where torchax is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "torchax_cases.py"


@pytest.mark.skipif(importlib.util.find_spec("torchax") is None, reason="torchax is not installed in this environment")
def test_torchax_cases_pass_in_their_own_process():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=1200,
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    print(f"torchax_cases.py: {summary}")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 50 and "skipped" not in summary, summary
