"""Session-wide checks that turn an environment problem into one clear message instead of dozens of errors."""
import os
import shutil
import tempfile

import pytest

# One full run writes ~1.5 GiB under the temp dir (tiny saved models, converted checkpoints, vLLM caches).
# Below this much free space the run fails midway with "No space left on device" on whichever test writes next.
MIN_FREE_GIB = 3.0


def pytest_sessionstart(session):
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free / 2**30
    if free < MIN_FREE_GIB and not os.environ.get("FCTRAIN_SKIP_DISK_CHECK"):
        pytest.exit(f"only {free:.1f} GiB free under {tmp}; the tests need ~{MIN_FREE_GIB:.0f} GiB "
                    "(free some space, or set FCTRAIN_SKIP_DISK_CHECK=1 to try anyway)", returncode=1)
