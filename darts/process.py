"""What a command does first, before Paddle is imported: quiet Paddle's C++ logging and tune malloc.

    from darts import process
    process.prepare()      # the first call of every command, before `import paddle` (and the modules that do)
"""
import ctypes
import os
import warnings


def prepare():
    """Paddle's C++ logging (executor banners, PIR warnings) and its Python UserWarnings are noise for a
    user; malloc as _malloc_settings says.  Must run before any thread starts, so before paddle is imported."""
    os.environ.setdefault('GLOG_minloglevel', '2')
    warnings.filterwarnings('ignore', category=UserWarning, module=r'paddle\b.*')
    _malloc_settings()


def _malloc_settings():
    """glibc malloc tuned for a process whose steps allocate and free the same large tensors:

    - One arena.  Paddle's executor runs kernels on worker threads, and glibc gives each
      thread its own heap: activations freed in one arena are not reused by allocations in
      another, so every static program a step runs left its own high-water mark resident.
    - No mmap, no trimming.  Blocks over 32 MB (a [96, 144, 32, 32] activation is 57 MB)
      were mmapped and unmapped every step, and each reuse faulted its pages in again.
      Kept in the heap, freed memory is reused as it is.
    Figures in docs/performance.md."""
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-8, 1)            # M_ARENA_MAX
    mallopt(-4, 0)            # M_MMAP_MAX: no block is mmapped
    mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: free memory at the heap's top is kept
