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


def _one_malloc_arena():
    """Paddle's executor runs kernels on worker threads, and glibc gives each thread its
    own heap (arena): activations freed in one arena are not reused by allocations in
    another, so every static program a step runs left its own high-water mark resident
    (measured: 2.3 GB against 1.3 GB for a second-order step at batch 16, C=8, 5 cells).
    One arena for the process shares freed memory between them.  Must run before any
    thread starts, so before paddle is imported."""
    try:
        ctypes.CDLL('libc.so.6').mallopt(-8, 1)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


_one_malloc_arena()


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
    2 for a UserError or a full / read-only disk, 130 for Ctrl-C, 143 for SIGTERM."""
    args = parse(argv)
    with stop_on_sigterm():
        try:
            run(args)
        except UserError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            where = f'; continue with --resume {current_run[0].path} once it can be written' if current_run else ''
            print(f'error: cannot write {e.filename or "the run folder"}: {e.strerror}; the last checkpoint is '
                  f'intact{where}', file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _report_stop('interrupted')
            return 130
    return 0


def _report_stop(what):
    """One line: what stopped the run, and how to continue it (also in the run's log.txt)."""
    if current_run:
        message = f'{what}: the last checkpoint is kept; continue with --resume {current_run[0].path}'
        current_run[0].log(message, file_only=True)
    else:
        message = f'{what} before the run folder was made: nothing was written'
    if not os.environ.get(QUIET_STOP):
        print(f'\n{message}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_sigterm():
    """Within: SIGTERM (what batch schedulers and Paddle's launcher send) ends the process at
    once like Ctrl-C, with one line (_report_stop) and exit status 143, after any atomic write in
    progress has finished, so the last checkpoint stays whole.

    Python runs a signal handler only between bytecodes of the main thread, which can be inside
    one exe.run for minutes, and Paddle's own handler prints a C++ FatalError block; so SIGTERM is
    blocked in this thread, and in every thread started from it later (Paddle's), and a watcher
    thread takes it with sigtimedwait."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    done = threading.Event()

    def watch():
        while not done.is_set():
            if signal.sigtimedwait([signal.SIGTERM], 0.2) is not None:
                with write_lock:
                    _report_stop('terminated (SIGTERM)')
                    sys.stdout.flush()
                    os._exit(143)
    watcher = threading.Thread(target=watch, name='sigterm-watch', daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def select_place(device, custom_kernels=True):
    """The Paddle place for --device gpu|cpu|auto (auto: the GPU when there is one).
    custom_kernels=False (--no_custom_kernels): Paddle's kernels only (fast_kernels)."""
    import paddle
    if not custom_kernels:
        import fast_kernels
        fast_kernels.disable()
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
        paddle.set_device('gpu:0')
        return paddle.CUDAPlace(0)
    paddle.set_device('cpu')
    return paddle.CPUPlace()


class EpochStats:
    """The running figures of an epoch's training steps: images, mean loss, top-1, images/s."""

    def __init__(self, epoch):
        self.epoch, self.steps, self.images, self.loss_sum, self.correct = epoch, 0, 0, 0.0, 0
        self.started, self.train_seconds = time.time(), None

    def add(self, loss, logits, labels):
        """One step's mean loss and logits; a non-finite loss is one line (the last checkpoint is kept)."""
        if not np.isfinite(loss):
            raise UserError(f'training loss became {loss} at epoch {self.epoch + 1} step {self.steps + 1}; '
                            f'lower --learning_rate (the last checkpoint is kept)')
        self.steps += 1
        self.images += len(labels)
        self.loss_sum += float(loss) * len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())

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

    def __init__(self, log, total, prefix, every, seconds=30.0):
        self.log, self.total, self.prefix, self.every, self.seconds = log, total, prefix, every, seconds
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
