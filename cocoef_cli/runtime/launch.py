"""``python -m cocoef_cli.runtime.launch`` — start several device processes on this host, cheaply.

Imports torch and the device code once, then forks one child per rank in ``COCOEF_RANKS``
(``first-last``), each running :func:`cocoef_cli.distributed.device.main` with its RANK (WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and the run token ``COCOEF_TOKEN`` from the environment). Forking before any thread pool or process group
exists is safe and saves one torch import per device. The launcher exits when every child has; if
one fails it terminates the others and exits 1. On Linux the launcher dies with its parent and the
children with the launcher (no orphans).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass


def _terminate(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def main() -> int:
    _die_with_parent()
    import torch

    from cocoef_cli.distributed import device

    torch.set_num_threads(int(os.environ.get("COCOEF_DEVICE_THREADS", "1")))
    first, _, last = os.environ["COCOEF_RANKS"].partition("-")
    children: dict[int, int] = {}
    for rank in range(int(first), int(last or first) + 1):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                _die_with_parent()
                os.environ["RANK"] = str(rank)
                code = device.main()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = rank

    def stop(signum, frame):
        _terminate(children)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    status = 0
    while children:
        pid, st = os.wait()
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(st)
        if code != 0 and status == 0:
            status = 1
            _terminate(children)
    return status


if __name__ == "__main__":
    sys.exit(main())
