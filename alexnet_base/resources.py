"""Process resources that a run of days at ImageNet's scale has to keep bounded: open files, the C
heap, the shared memory of DALI's reader processes, and how worker processes are started. They
act on the calling process only and leave a user's own settings alone."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import signal
import sys
import threading

SHM_DIR = "/dev/shm"  # where DALI's reader processes put their batches (shm_open)


def raise_open_file_limit(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards `want`, as far as the hard limit allows. Nothing
    relies on it (readers keep a bounded number of files open); it leaves headroom for DALI,
    torch and the process group. Returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def release_free_heap() -> bool:
    """Give the free pages of the C heap back to the system (glibc's malloc_trim), in every
    malloc arena (the loader's policy: reading.HeapTrim). Why: DALI's decoders and the PyTorch
    iterator allocate per image and per batch from several arenas, and glibc keeps the freed
    pieces, fragmented; a fixed mmap threshold instead would pay a page fault per page of every
    such buffer (BENCHMARKS.md). Returns whether memory was released; False off glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@functools.lru_cache(maxsize=1)
def _glibc():
    if platform.libc_ver()[0] != "glibc":
        return None
    import ctypes
    return ctypes.CDLL(None)


def shm_free(path: str = SHM_DIR) -> int | None:
    """Bytes free for unprivileged use in the shared-memory file system, None where there is
    none to check."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def children_deaf_to(signals=(signal.SIGUSR1,)):
    """Processes started inside (DALI's reader processes) never take `signals`: Slurm signals
    every process of a job step (scancel --signal, --signal=USR1@N), and SIGUSR1 must stop the
    trainer, which stops at a step with a checkpoint and then ends its readers, not kill the
    readers under it mid-epoch (their default action). The signals are blocked meanwhile, not
    ignored: one that arrives here is delivered on leaving, and the children keep them blocked
    (a signal mask survives fork and exec). Not SIGTERM: DALI ends a reader that does not
    leave by itself with it. In the main thread only (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def start_method() -> str:
    """How to start worker processes from this process: "fork" (cheap: nothing to pickle or
    import again) on Linux while the CUDA driver is not initialised, else "spawn". A fork after
    CUDA is up copies a driver that must not be used in the child, and DALI refuses it outright;
    any torch.cuda call, even torch.cuda.is_available() in a CPU run, initialises the driver."""
    if not sys.platform.startswith("linux") or cuda_driver_initialised():
        return "spawn"
    return "fork"


def cuda_driver_initialised() -> bool:
    """DALI's check of the CUDA driver (whoever initialised it); torch's where DALI is absent."""
    try:
        from nvidia.dali.backend import IsDriverInitialized
    except ImportError:
        torch = sys.modules.get("torch")
        return bool(torch is not None and torch.cuda.is_initialized())
    return bool(IsDriverInitialized())


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container or taskset sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
