"""How many CPU threads torch's intra-op pool gets: chosen on purpose, not left to torch's default.

torch starts one intra-op thread per core. On a small machine that is shared with anything else (a browser, the
Streamlit server, a second recording) the threads wait for each other at every operator: recording the demo
model on a busy 2-core machine ran several times slower with 2 threads than with 1 (``benchmarks/threads.py``,
numbers in ``benchmarks/results/threads.md``). The policy, in order:

1. an explicit :func:`set_threads` call (the CLI's ``--threads`` sets :data:`THREADS_ENV`, which reaches it);
2. ``$MOELENS_THREADS``;
3. ``$OMP_NUM_THREADS`` if set: torch already honours it, so it is left alone;
4. otherwise :func:`default_threads`: 1 thread on machines with at most 2 cores, else half the cores, at most 8.

:func:`apply_thread_policy` is called where torch work starts (``moelens.load``, ``moelens.record``,
``moelens.steer``, the demo), once per process, so that a later ``torch.set_num_threads`` of the user's own
wins. Importing this module does not import torch.
"""

from __future__ import annotations

import os

from moelens.errors import InputError

#: Environment variable that overrides the thread count (also set by ``moelens --threads N``).
THREADS_ENV = "MOELENS_THREADS"
#: More intra-op threads than this rarely pays off for the batch sizes moelens records with.
MAX_DEFAULT_THREADS = 8

_applied: int | None = None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """1 thread on <= 2 cores (the other core stays free for the app, the OS and anything else), else
    ``cores // 2`` up to :data:`MAX_DEFAULT_THREADS`."""
    cores = available_cores() if cores is None else cores
    if cores <= 2:
        return 1
    return min(cores // 2, MAX_DEFAULT_THREADS)


def parse_threads(value: str | int, source: str = THREADS_ENV) -> int:
    """A positive thread count from ``value``, or an :class:`InputError` naming where the bad value came from."""
    try:
        threads = int(str(value).strip())
    except ValueError:
        threads = 0
    if threads < 1:
        raise InputError(f"{source} must be a positive number of threads, not {value!r}")
    return threads


def chosen_threads() -> int | None:
    """The thread count the policy picks, or None when ``$OMP_NUM_THREADS`` already decides it."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        return parse_threads(env)
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return default_threads()


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads in torch from now on (and in processes this one starts)."""
    threads = parse_threads(threads, "the number of threads")
    os.environ[THREADS_ENV] = str(threads)
    return _set_torch_threads(threads)


def apply_thread_policy() -> int:
    """Apply the policy the first time torch work starts in this process; returns torch's thread count.

    Later calls change nothing, so a ``torch.set_num_threads`` made by the user after loading a model stays.
    """
    import torch

    if _applied is not None:
        return torch.get_num_threads()
    threads = chosen_threads()
    return torch.get_num_threads() if threads is None else _set_torch_threads(threads)


def _set_torch_threads(threads: int) -> int:
    global _applied
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _applied = threads
    return threads
