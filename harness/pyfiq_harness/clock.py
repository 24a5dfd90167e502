"""The clock shim: ``clock_shift.c``, compiled at run time with gcc into a shared library that,
preloaded into redis-server, shifts its wall clock (the ``clock`` fault, and the fencing tests
across a restart with a wrong clock). Never shipped as a binary.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

CLOCK_SHIFT_ENV = "PYFIQ_CLOCK_SHIFT_MS"
CLOCK_SHIM_SOURCE = Path(__file__).with_name("clock_shift.c")
_clock_shim: Path | None = None
_clock_shim_lock = threading.Lock()


def build_clock_shim() -> Path:
    """Compile ``clock_shift.c`` (once per process, into a temporary directory) and return the
    shared library: preloaded into redis-server, it shifts Redis's wall clock by
    ``$PYFIQ_CLOCK_SHIFT_MS``. Linux with gcc only; RuntimeError says why it cannot be built."""
    global _clock_shim
    with _clock_shim_lock:
        if _clock_shim is not None and _clock_shim.exists():
            return _clock_shim
        if sys.platform != "linux":
            raise RuntimeError("the clock shim needs Linux (LD_PRELOAD of a glibc process)")
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("the clock shim needs a C compiler: install gcc")
        out = Path(tempfile.mkdtemp(prefix="pyfiq-clock-")) / "libpyfiq_clock.so"
        proc = subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(CLOCK_SHIM_SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building the clock shim failed: {proc.stderr.strip()}")
        _clock_shim = out
        return out
