"""Data parallelism through Paddle's own launcher: several processes (one per GPU, or CPU
processes talking through gloo), one result.

    python -m paddle.distributed.launch --nproc_per_node 2 train_search.py <the usual flags>

The launcher starts each process with PADDLE_TRAINER_ID (its rank) and PADDLE_TRAINERS_NUM
(the world size); without it a process is a world of one, and nothing here does anything.

  world = distributed.setup(device)   this rank's device, and the collective that the static
                                      programs' all-reduces use (gloo on CPU, NCCL on GPUs)
  world.writer                        rank 0, the "master process": the only one that writes
  world.shard(n)                      this rank's contiguous part of a global batch of n
  mean_across_ranks(tensors)          inside a program: the mean over the ranks, one all-reduce
  world.sum(exe, values)              on the host: the sum over the ranks of a small array

Every rank draws the same seeded batches and takes its part of each, every rank applies the
same averaged update, so weights and architecture stay identical across ranks; a decision
that could differ (a non-finite loss) is taken on summed figures, by every rank alike.
"""
import hashlib
import os
import stat
import threading
import time

import numpy as np

from darts import tensors
from darts.errors import UserError
from darts import kernels

# --help of the training scripts
LAUNCH_HELP = """several processes, GPUs or machines:
  python -m paddle.distributed.launch --nproc_per_node N SCRIPT <the same flags>
  starts N processes (one per GPU; on a CPU, processes talking through gloo); machines: the
  launcher's --nnodes and --master.  --batch_size stays the global batch (a multiple of N, each
  process takes a contiguous 1/N of every batch); learning rates are not rescaled; batch-norm
  statistics are each process's own, and their running averages are averaged before every
  evaluation and checkpoint; only rank 0 writes the run folder (which every machine must see
  for --resume).  See docs/distributed.md."""

RANK = int(os.environ.get('PADDLE_TRAINER_ID', '0'))
WORLD = int(os.environ.get('PADDLE_TRAINERS_NUM', '1'))
# A rank that has not finished a step (or an evaluation) for this long is taken to be stuck
# behind a hung peer: it stops (gloo times a collective out after 30 s by itself; NCCL never does).
STALL_SECONDS = float(os.environ.get('PADDLE_DARTS_STALL_SECONDS', '1800'))
_ERROR_KEY = 'paddle-darts/error'


def shard_bounds(n, rank=RANK, world=WORLD):
    """[lo, hi) of rank's contiguous part of n items (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def mean_across_ranks(tensors, world=WORLD):
    """Inside a static program: each tensor averaged over the ranks, as one all-reduce (SUM,
    then 1/world: AVG is refused in static mode) of their concatenation.  world 1: unchanged."""
    if world == 1:
        return list(tensors)
    import paddle
    from paddle.distributed import ReduceOp
    flat = [paddle.reshape(t, [-1]) if len(t.shape) != 1 else t for t in tensors]
    joined = paddle.concat(flat) if len(flat) > 1 else flat[0] * 1.0   # the all-reduce is in place
    summed = paddle._C_ops.all_reduce_(joined, 0, ReduceOp.SUM)
    mean = summed * (1.0 / world)
    parts = paddle.split(mean, [int(np.prod(t.shape)) for t in tensors]) if len(tensors) > 1 else [mean]
    return [paddle.reshape(p, t.shape) if len(t.shape) != 1 else p for p, t in zip(parts, tensors)]


def select_place(device, custom_kernels=True):
    """The Paddle place for --device gpu|cpu|auto (auto: the GPU when there is one); in a
    data-parallel job the GPU the launcher gave this rank.  custom_kernels=False
    (--no_custom_kernels): Paddle's kernels only (fast_kernels)."""
    import paddle
    if not custom_kernels:
        kernels.disable()
    has_cuda = paddle.is_compiled_with_cuda()
    count = paddle.device.cuda.device_count() if has_cuda else 0
    if device == 'auto':
        device = 'gpu' if count > 0 else 'cpu'
    if device == 'gpu':
        if not has_cuda:
            raise UserError('--device gpu: this Paddle build has no CUDA support; install '
                            'paddlepaddle-gpu from Paddle\'s package index, or use --device cpu')
        if count == 0:
            raise UserError('--device gpu: Paddle has CUDA support but sees no GPU; use --device cpu')
        gpu = paddle.distributed.ParallelEnv().device_id if WORLD > 1 else 0   # FLAGS_selected_gpus
        paddle.set_device(f'gpu:{gpu}')
        return paddle.CUDAPlace(gpu)
    paddle.set_device('cpu')
    return paddle.CPUPlace()


def setup(device, custom_kernels=True, on_stall=None):
    """This rank's World: its place, and (with more than one rank) the communication context
    that ring 0 of the programs' all-reduces runs on.  on_stall(line, code): how the stall
    watchdog stops the process (lifecycle.stop_now)."""
    global current
    place = select_place(device, custom_kernels)
    current = World(RANK, WORLD, place, on_stall)
    if WORLD > 1:
        current.connect()
    return current


class World:
    """This process's rank among `size`, its place, and the host-side collectives."""

    def __init__(self, rank=0, size=1, place=None, on_stall=None):
        self.rank, self.size, self.place, self.on_stall = rank, size, place, on_stall
        self.writer = rank == 0
        self.backend = None if size == 1 else ('nccl' if _is_gpu(place) else 'gloo')
        self.store, self._sum_program, self._shared = None, None, 0
        # the store's client is not thread-safe: the SIGTERM watcher asks it too (peer_error), and
        # interleaved requests get each other's replies
        self._store_lock = threading.Lock()
        self._last_beat, self._watchdog = time.time(), None

    def describe(self):
        if self.size == 1:
            return f'1 process ({_device_name(self.place)})'
        return (f'{self.size} processes ({self.backend}; this is rank {self.rank}, {_device_name(self.place)}); '
                f'--batch_size is the global batch, {self.size} shares of it per step')

    def connect(self):
        """Register ring 0 (gloo on CPU, NCCL on GPU, as paddle.distributed.collective does for its
        own static-graph collectives) on the launcher's TCP store.  The NCCL branch is untested here."""
        import paddle
        from paddle.base import core
        store = core.create_or_get_global_tcp_store()
        with self._store_lock:
            self.store = store
            if self.backend == 'gloo':
                core.CommContextManager.create_gloo_comm_context(store, '0', self.rank, self.size)
            else:
                endpoints = os.environ.get('PADDLE_TRAINER_ENDPOINTS', '').replace(',', '') + 'ring_id:0'
                core.CommContextManager.set_device_id(paddle.distributed.ParallelEnv().device_id)
                core.CommContextManager.create_nccl_comm_context(store, '0', self.rank, self.size,
                                                                 hashlib.md5(endpoints.encode()).hexdigest())

    # ------------------------------------------------------------------ data

    def shard(self, n):
        """slice of this rank's contiguous part of n items."""
        return slice(*shard_bounds(n, self.rank, self.size))

    def check_batch(self, batch_size, flag='--batch_size'):
        if batch_size % self.size:
            raise UserError(f'{flag} {batch_size} is the global batch and must be a multiple of the {self.size} '
                            f'processes (each takes an equal share of it)')

    # ------------------------------------------------------------------ host-side collectives

    def sum(self, exe, values):
        """The element-wise sum over the ranks of a small float array (every rank calls it alike)."""
        values = np.asarray(values, np.float64)
        if self.size == 1:
            return values
        import paddle
        if self._sum_program is None:   # built once, like every program of a run
            program = paddle.static.Program()
            with paddle.static.program_guard(program, paddle.static.Program()):
                x = paddle.static.data('distributed.values', [-1], 'float64')
                out = mean_across_ranks([x], self.size)[0] * float(self.size)
            self._sum_program = program, out
        program, out = self._sum_program
        (total,) = exe.run(program, feed={'distributed.values': values.reshape(-1)}, fetch_list=[out])
        self.beat()
        return np.asarray(total, np.float64).reshape(values.shape)

    def barrier(self, name):
        """Return once every rank has called barrier(name), through the launcher's TCP store: unlike a
        collective, it has no 30 s limit, so it can follow work whose length differs by rank (reading
        and decoding the data, building the programs)."""
        if self.size == 1:
            return
        key = f'paddle-darts/barrier/{name}'
        self._add(key, 1)
        while self._add(key, 0) < self.size:
            time.sleep(0.05)
        self.beat()

    def gather(self, exe, values):
        """[size, ...]: every rank's `values`, on every rank."""
        values = np.asarray(values, np.float64)
        slots = np.zeros((self.size,) + values.shape)
        slots[self.rank] = values
        return self.sum(exe, slots)

    def average_tensors(self, exe, scope, names):
        """Set the scope's tensors `names` to their mean over the ranks (BN running statistics,
        which each rank updates from its own share of the batches)."""
        if self.size == 1 or not names:
            return
        arrays = tensors.get_tensors(scope, names)
        flat = np.concatenate([arrays[n].reshape(-1) for n in names]).astype(np.float64)
        mean = (self.sum(exe, flat) / self.size).astype(np.float32)
        sizes = np.cumsum([arrays[n].size for n in names])[:-1]
        tensors.set_tensors(scope, self.place, {n: part.reshape(arrays[n].shape)
                                                for n, part in zip(names, np.split(mean, sizes))})

    def check_same(self, exe, what, values):
        """UserError unless every rank holds the same `values` (a few numbers, say a checkpoint's epoch
        and checksum); `what` names them."""
        every = self.gather(exe, values)
        if not np.all(every == every[0]):
            raise UserError(f'the {self.size} processes hold different {what} ({every.tolist()}); '
                            f'on several machines the run folder must be one they all see')

    def share(self, key, text):
        """The writer's `text` (a short string) on every rank, through the launcher's TCP store."""
        if self.size == 1:
            return text
        self._shared += 1
        key = f'paddle-darts/shared/{self._shared}/{key}'
        with self._store_lock:
            if self.writer:
                self.store.set(key, text)
                return text
            return self.store.get(key).decode()

    def _add(self, key, n):
        with self._store_lock:
            return self.store.add(key, n)

    def wait_for_writer(self, what):
        """Return once the writer has reached this call too (it writes on its way here)."""
        self.barrier(what)

    # ------------------------------------------------------------------ failures

    def publish_error(self, message, code):
        """Tell rank 0 (the store's host) why this rank is about to exit, so its one line can say."""
        if self.store is None or self.writer:
            return
        try:
            with self._store_lock:
                self.store.set(_ERROR_KEY, f'{self.rank}\t{code}\t{message}')
                self.store.add(_ERROR_KEY + '/count', 1)
        except Exception:  # noqa: BLE001 - the store's host is gone: nobody is left to tell
            pass

    def peer_error(self, wait=0.0):
        """(rank, exit code, message) that another rank published before it stopped, or None.
        Only rank 0 asks: it hosts the store, so the question cannot hang on a dead peer."""
        if self.store is None or not self.writer:
            return None
        deadline = time.time() + wait
        while True:
            if not self._store_lock.acquire(timeout=max(deadline - time.time(), 0.5)):
                return None   # the main thread is inside a store call: no answer in time
            try:
                if self.store.add(_ERROR_KEY + '/count', 0) > 0:
                    rank, code, message = self.store.get(_ERROR_KEY).decode().split('\t', 2)
                    return int(rank), int(code), message
            finally:
                self._store_lock.release()
            if time.time() >= deadline:
                return None
            time.sleep(0.1)

    def beat(self):
        """A collective (a step's figures, an evaluation's sums, a barrier) finished: the ranks are
        not stuck.  The first one starts the watchdog (when there is an on_stall to call)."""
        self._last_beat = time.time()
        if self._watchdog is None and self.on_stall is not None:
            self._watchdog = threading.Thread(target=self._watch, name='stall-watch', daemon=True)
            self._watchdog.start()

    def _watch(self):
        while True:
            time.sleep(min(10.0, STALL_SECONDS / 4))
            if time.time() - self._last_beat > STALL_SECONDS:
                self.on_stall(f'error: no step finished for {STALL_SECONDS:.0f} s: a process of this job is stuck '
                              f'(PADDLE_DARTS_STALL_SECONDS sets the limit)', 2)


# the World of this process once setup() has made it (lifecycle.run_main reports failures through it)
current = None


def publish_error(message, code):
    if current is not None:
        current.publish_error(message, code)


def peer_stop(wait=0.0):
    """(one line, exit code) for rank 0 when another rank stopped with an error first, else None."""
    try:
        peer = current.peer_error(wait) if current is not None else None
    except Exception:  # noqa: BLE001 - the store failed: this rank's own stop line will do
        peer = None
    if peer is None:
        return None
    rank, code, message = peer
    return f'error: process {rank} of {current.size} stopped: {message}', code


def tell_console(line):
    """Rank 0 under Paddle's launcher: `line` on the launcher's stderr too.  The launcher shows
    this rank's output only while the job runs well: once it stops the job (Ctrl-C, a failed
    rank) it stops reading, so a rank's last line would be in its workerlog alone."""
    if RANK != 0 or 'PADDLE_TRAINER_ID' not in os.environ:
        return
    target = f'/proc/{os.getppid()}/fd/2'
    try:
        with open(f'/proc/{os.getppid()}/cmdline', 'rb') as f:
            launcher = b'paddle.distributed.launch' in f.read()   # not protocol.py, the parent of its runs
        # a terminal or a pipe; not a regular file, which the shell may have opened without O_APPEND
        # (the launcher's next lines would overwrite ours)
        mode = os.stat(target).st_mode
        console = stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)
        if launcher and console and not os.path.samestat(os.fstat(2), os.stat(target)):
            fd = os.open(target, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, (line.strip() + '\n').encode())
            finally:
                os.close(fd)
    except OSError:   # not Linux, or the launcher is gone
        pass


def collective_failure(error, resume_hint=''):
    """(one line, exit code) when `error` is how a collective fails once another rank has stopped,
    else None (single process, or another error: a bug, to be shown in full); resume_hint ends the
    line ('; continue with --resume RUN_DIR')."""
    if current is None or current.size == 1:
        return None
    stop = peer_stop(wait=2.0)
    if stop is not None:
        return stop
    text = f'{type(error).__name__}: {error}'
    if any(s in text for s in ('std::exception', 'gloo', 'Gloo', 'onnection', 'losed', 'imed out', 'NCCL')):
        return (f'error: another process of this job stopped during a collective operation ({text[:100]}); '
                f'its log is in the launcher\'s --log_dir; the last checkpoint is kept{resume_hint}'), 2
    return None


def _is_gpu(place):
    return place is not None and 'gpu' in str(place).lower()


def _device_name(place):
    return 'CPU' if not _is_gpu(place) else str(place)
