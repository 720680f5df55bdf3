"""The curated public API stays honest: sorted, complete, importable without torch or ray."""

from __future__ import annotations

import subprocess
import sys

import pollinate


def test_all_is_sorted_and_resolvable():
    assert pollinate.__all__ == sorted(pollinate.__all__)
    assert len(set(pollinate.__all__)) == len(pollinate.__all__)
    for name in pollinate.__all__:
        assert getattr(pollinate, name) is not None, name


def test_every_public_member_is_listed():
    public = {
        name
        for name, value in vars(pollinate).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("pollinate")
    }
    assert public <= set(pollinate.__all__), public - set(pollinate.__all__)


def test_import_needs_no_heavy_dependency():
    code = (
        "import sys, pollinate, pollinate.simulation, pollinate.strategy, pollinate.data; "
        "heavy = [m for m in ('torch', 'ray', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_errors_share_one_root():
    for name in pollinate.__all__:
        value = getattr(pollinate, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, pollinate.PollinateError), name
