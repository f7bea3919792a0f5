"""The one place that turns `base.device` into a torch device."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ddm_ops.config import ParamsError


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda / cuda:N must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(f"base.device = {spec!r}: CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParamsError(f"base.device = {spec!r}: only {torch.cuda.device_count()} CUDA devices")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so a wall-clock timing on CUDA measures the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc mallopt parameters


def worker_slot() -> int:
    """A number identifying the worker running this task: the Dask worker's name, else the process id."""
    try:
        from distributed import get_worker

        name = get_worker().name
        return int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        return os.getpid() if multiprocessing.parent_process() is not None else 0


def task_device(spec: str) -> torch.device:
    """The device of a per-cluster task: with several GPUs and no index given, one GPU per worker."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return torch.device("cuda", worker_slot() % torch.cuda.device_count())
    return device


def tune_process(threads: int) -> None:
    """Pin torch to `threads` threads and keep glibc's heap from returning and re-asking memory around every tensor.

    Dask workers start with MALLOC_TRIM_THRESHOLD_=65536, and any fixed malloc setting also switches off glibc's
    adaptive mmap threshold, so that every tensor above 128 KiB became a fresh mmap: this project's small-tensor
    work ran 1.5-2x slower in Dask workers than in a plain process (measured). A large trim threshold, top pad and
    mmap threshold undo it. No effect on results; nothing happens where the C library is not glibc.
    """
    torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_TOP_PAD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest


@contextmanager
def peak_memory(record: dict[str, float], key: str, interval: float = 0.1) -> Iterator[None]:
    """record[key] = peak extra resident memory (MiB) of this process and its child processes during the block.

    Sampled every `interval` seconds (torch's CPU allocator is invisible to Python's tracemalloc), the list of child
    processes refreshed every second; on CUDA, also the peak of torch's GPU allocations under `<key>_gpu`.
    """
    import threading

    import psutil

    me = psutil.Process()
    family = [me]

    def resident() -> int:
        total = 0
        for p in family:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # ended meanwhile
                pass
        return total

    base = resident()
    peak, done = [base], threading.Event()

    def sample() -> None:
        ticks = 0
        while not done.wait(interval):
            if ticks % round(1 / interval) == 0:
                family[:] = [me, *me.children(recursive=True)]
            ticks += 1
            peak[0] = max(peak[0], resident())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        record[key] = (max(peak[0], resident()) - base) / 2**20
        if torch.cuda.is_available():
            record[f"{key}_gpu"] = torch.cuda.max_memory_allocated() / 2**20
