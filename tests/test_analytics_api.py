"""The analytics package's public API stays honest: sorted, complete, importable light."""

from __future__ import annotations

import subprocess
import sys

import pollinate.analytics as analytics
from pollinate.errors import PollinateError


def test_all_is_sorted_and_resolvable():
    assert analytics.__all__ == sorted(analytics.__all__)
    assert len(set(analytics.__all__)) == len(analytics.__all__)
    for name in analytics.__all__:
        assert getattr(analytics, name) is not None, name


def test_every_public_member_is_listed():
    public = {
        name
        for name, value in vars(analytics).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("pollinate")
        and not isinstance(value, type(analytics))
    }
    assert public <= set(analytics.__all__), public - set(analytics.__all__)


def test_errors_share_one_root():
    for name in analytics.__all__:
        value = getattr(analytics, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, PollinateError), name


def test_import_needs_no_pandas_or_heavy_dependency():
    code = (
        "import sys, pollinate.analytics; "
        "print(','.join(m for m in ('pandas', 'sklearn', 'torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
