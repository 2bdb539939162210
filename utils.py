"""Plumbing shared by the scripts: one-line errors, the device, progress, atomic files and checkpoints."""
import argparse
import contextlib
import ctypes
import errno
import json
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np

from errors import UserError

# Paddle's C++ logging (executor banners, PIR warnings) is noise for a user.
os.environ.setdefault('GLOG_minloglevel', '2')
warnings.filterwarnings('ignore', category=UserWarning, module=r'paddle\b.*')


def _malloc_settings():
    """glibc malloc tuned for a process whose steps allocate and free the same large tensors:

    - One arena.  Paddle's executor runs kernels on worker threads, and glibc gives each
      thread its own heap: activations freed in one arena are not reused by allocations in
      another, so every static program a step runs left its own high-water mark resident.
    - No mmap, no trimming.  Blocks over 32 MB (a [96, 144, 32, 32] activation is 57 MB)
      were mmapped and unmapped every step, and each reuse faulted its pages in again.
      Kept in the heap, freed memory is reused as it is.
    Figures in the README ("Performance").  Must run before any thread starts, so before paddle is imported."""
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-8, 1)            # M_ARENA_MAX
    mallopt(-4, 0)            # M_MMAP_MAX: no block is mmapped
    mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: free memory at the heap's top is kept


_malloc_settings()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is in --help)."""

    def error(self, message):
        print(f'{self.prog}: error: {message} (see --help)', file=sys.stderr)
        raise SystemExit(2)


# the open run folder of this process (a runfolder.Run sets itself here), for the stop messages
current_run = []
# held by atomic_write: a stop (SIGTERM) waits for the write, so the file it replaces stays whole
write_lock = threading.Lock()
# set by protocol.py for its children: their stop is reported once, by the protocol
QUIET_STOP = 'PADDLE_DARTS_QUIET_STOP'


def run_main(run, argv, parse):
    """Parse, run, and turn expected failures into one line on stderr and an exit code:
    2 for a UserError or a full / read-only disk, 130 for Ctrl-C, 143 for SIGTERM.  In a
    data-parallel job a rank's failure is also told to rank 0 (distributed.publish_error), and
    a collective that fails because another rank stopped is one line too."""
    import distributed
    args = parse(argv)
    with stop_on_sigterm(command_line=argv is None):
        try:
            run(args)
        except UserError as e:
            distributed.publish_error(str(e), 2)
            return conclude(f'error: {e}', 2)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            where = f'; continue with --resume {current_run[0].path} once it can be written' if current_run else ''
            message = f'cannot write {e.filename or "the run folder"}: {e.strerror}; the last checkpoint is intact'
            distributed.publish_error(message, 2)
            return conclude(f'error: {message}{where}', 2)
        except KeyboardInterrupt:
            return conclude(_stop_line('interrupted'), 130)
        except Exception as e:  # noqa: BLE001 - a collective that failed because another rank stopped?
            failure = distributed.collective_failure(e)
            if failure is None:
                raise
            line, code = failure   # said by rank 0 alone, also on the launcher's console
            return conclude(line if distributed.RANK == 0 else None, code, console=True)
        return conclude(None, 0)


_ended = threading.Event()   # the run has its outcome (conclude): a later stop changes nothing


def conclude(line, code, console=False, exit_now=False):
    """The run's outcome, once: `line` on stderr (None: nothing), status `code`; the first of the
    main thread's return and a stop (SIGTERM, the stall watchdog) wins.  exit_now: end the process
    here (a stop), once an atomic write in progress has finished, so the file it replaces is whole.
    console: also on the launcher's console in a data-parallel job (distributed.tell_console)."""
    import distributed
    with write_lock:
        if _ended.is_set():
            return code
        _ended.set()
        if line:
            print(line, file=sys.stderr, flush=True)
            if console:
                distributed.tell_console(line)
        if exit_now:
            sys.stdout.flush()
            os._exit(code)
    return code


def _stop_line(what):
    """What stopped the run and how to continue it (also written to the run's log.txt); None for a
    child of protocol.py, which says it once for all (QUIET_STOP)."""
    if current_run:
        message = f'{what}: the last checkpoint is kept; continue with --resume {current_run[0].path}'
        current_run[0].log(message, file_only=True)
    else:
        message = f'{what} before the run folder was made: nothing was written'
    return None if os.environ.get(QUIET_STOP) else '\n' + message


def stop_now(line, code, console=False):
    """A stop from another thread: end the process at once (conclude with exit_now)."""
    conclude(line, code, console=console, exit_now=True)


@contextlib.contextmanager
def stop_on_sigterm(command_line=False):
    """Within: SIGTERM (what batch schedulers and Paddle's launcher send) ends the process at
    once like Ctrl-C, with one line and exit status 143; or, in a data-parallel job that the
    launcher stops because another rank failed, with that rank's line and exit status.

    In a data-parallel job only rank 0 says why it stops, and when the SIGTERM came from the
    launcher (it stops every rank when one fails, or when it is stopped itself) it says so on the
    launcher's console too; a rank stopped by someone else is the one the launcher reports.

    Python runs a signal handler only between bytecodes of the main thread, which can be inside
    one exe.run for minutes, and Paddle's own handler prints a C++ FatalError block (or, during the
    first step's preparation, ends the process silently); so SIGTERM is blocked in this thread, and
    in every thread started from it later, and a watcher thread takes it with sigtimedwait.  Threads
    started before (at Paddle's import) do not block it: there Python's handler replaces Paddle's
    and reports the signal through a wakeup pipe, which the watcher reads too.  Afterwards, for a
    process that is the command (command_line), SIGTERM is ignored: it is exiting with its own
    status (Paddle's launcher sends SIGTERM three times, 0.2 s apart); otherwise (a test calling
    main) the signal handling is as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import distributed
    import select
    _ended.clear()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: None)
    done = threading.Event()

    def woken():
        """SIGTERM seen by a thread that does not block it (the pipe also carries Ctrl-C's byte)."""
        if not select.select([wake_r], [], [], 0)[0]:
            return False
        return signal.SIGTERM in os.read(wake_r, 64)

    def watch():
        while not done.is_set():
            got = signal.sigtimedwait([signal.SIGTERM], 0.1)
            if got is None and not woken() or _ended.is_set():
                continue
            # sent by the parent (the launcher stopping its job)?  unknown when it came through the pipe
            console = got.si_pid == os.getppid() if got else distributed.WORLD > 1
            line, code = distributed.peer_stop() or (_stop_line('terminated (SIGTERM)'), 143)
            stop_now(line if distributed.RANK == 0 else None, code, console=console)
    watcher = threading.Thread(target=watch, name='sigterm-watch', daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        if command_line:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        while signal.sigtimedwait([signal.SIGTERM], 0) is not None:   # one that came meanwhile is spent
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def silent(*parts, **kw):
    """print() for the ranks of a data-parallel job that do not write (rank 0 says it all)."""


class EpochStats:
    """The running figures of an epoch's training steps: images, mean loss, top-1, images/s.

    reduce(array) -> array: the sum over the ranks of a data-parallel job (identity in one
    process), so every rank holds the whole job's figures and decides alike."""

    def __init__(self, epoch, reduce=lambda local: local):
        self.epoch, self.reduce = epoch, reduce
        self.steps, self.images, self.loss_sum, self.correct = 0, 0, 0.0, 0
        self.started, self.train_seconds = time.time(), None

    def add(self, loss, logits, labels):
        """One step's mean loss and logits (of this rank's share); returns the step's images (of
        every rank).  A non-finite loss is one line (the last checkpoint is kept)."""
        n = len(labels)
        loss_sum, correct, images = self.reduce(np.array([float(loss) * n, (logits.argmax(1) == labels).sum(), n]))
        if not np.isfinite(loss_sum):
            raise UserError(f'training loss became {loss_sum / images} at epoch {self.epoch + 1} step '
                            f'{self.steps + 1}; lower --learning_rate (the last checkpoint is kept)')
        self.steps += 1
        self.images += int(images)
        self.loss_sum += float(loss_sum)
        self.correct += int(correct)
        return int(images)

    def close(self):
        """The training part of the epoch is over (what follows, evaluation, is not in images/s)."""
        self.train_seconds = time.time() - self.started

    @property
    def loss(self):
        return self.loss_sum / self.images

    @property
    def accuracy(self):
        return self.correct / self.images

    @property
    def images_per_sec(self):
        return self.images / self.train_seconds

    def elapsed(self):
        return time.time() - self.started


class Progress:
    """Progress within an epoch.

    On a terminal: a tqdm bar (steps, images/s, ETA) on stdout, and the periodic lines
    go to log.txt only.  Otherwise (a pipe, a file, a batch job) the lines are printed
    too.  A line is written every `every` steps, at least every `seconds` seconds, and
    at the last step.
    """

    def __init__(self, log, total, prefix, every, seconds=30.0, on_line=None):
        self.log, self.total, self.prefix, self.every, self.seconds = log, total, prefix, every, seconds
        self.on_line = on_line   # on_line(steps, images/s) with every line (TensorBoard's step curves)
        self.steps, self.images, self.t0 = 0, 0, time.time()
        self.last_line = self.t0
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=prefix, unit='step', leave=False, dynamic_ncols=True, file=sys.stdout)

    def update(self, images, message):
        """One step of `images` images done; message() gives the text of a line."""
        self.steps += 1
        self.images += images
        now = time.time()
        rate = self.images / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f'{rate:.1f} img/s', refresh=False)
            self.bar.update(1)
        if self.steps % self.every == 0 or self.steps == self.total or now - self.last_line >= self.seconds:
            self.last_line = now
            self.log(f'{self.prefix} step {self.steps}/{self.total} {message()} {rate:.1f} img/s',
                     file_only=self.bar is not None)
            if self.on_line is not None:
                self.on_line(self.steps, rate)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def atomic_write(path, write, mode='w'):
    """write(file) into path.tmp, then rename it over path: a kill leaves the old file whole.
    A failed write (a full or read-only disk) removes path.tmp and is one UserError line."""
    tmp = path + '.tmp'
    try:
        with write_lock:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = ' (the disk is full)' if e.errno in (errno.ENOSPC, errno.EDQUOT) else ''
        raise UserError(f'cannot write {path}{full}: {e.strerror or e}; the previous {os.path.basename(path)} '
                        f'is intact') from None


def save_checkpoint(path, arrays, meta):
    """All tensors and a JSON meta record in one .npz, replaced atomically (atomic_write):
    a kill or a full disk during the write leaves the previous checkpoint whole."""
    atomic_write(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays), 'wb')


def load_checkpoint(path):
    try:
        with np.load(path) as z:
            meta = json.loads(str(z['__meta__']))
            arrays = {k: z[k] for k in z.files if k != '__meta__'}
    except Exception as e:
        raise UserError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e})') from None
    return arrays, meta


def read_json(path):
    """A JSON file the project wrote; unreadable is one line."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path}: {e}') from None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1) + '\n'))


def cosine_lr(epoch, epochs, lr_max, lr_min):
    """lr_min + (lr_max - lr_min) * (1 + cos(pi * epoch / epochs)) / 2."""
    import math
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def softmax(a, axis=-1):
    """exp(a_i - max_j a_j) / sum_k exp(a_k - max_j a_j) along axis, in float64 (numpy)."""
    a = np.asarray(a, np.float64)
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def accuracy(logits, labels, k=1):
    """Fraction of rows whose label is among the k largest logits."""
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def set_tensors(scope, place, arrays):
    """Write numpy arrays into the scope's persistable tensors (creating them)."""
    for name, value in arrays.items():
        scope.var(name).get_tensor().set(np.ascontiguousarray(value, dtype='float32'), place)


def get_tensors(scope, names):
    return {n: np.array(scope.find_var(n).get_tensor()) for n in names}
