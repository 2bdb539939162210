"""Run plumbing shared by the training scripts: errors, device, run folder, log, checkpoints."""
import argparse
import contextlib
import ctypes
import errno
import json
import os
import sys
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


def run_main(run, argv, parse):
    """Parse, run, and turn expected failures into one line on stderr and an exit code."""
    args = parse(argv)
    try:
        run(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f'; continue with --resume {_current_run[0]} once it can be written' if _current_run else ''
        print(f'error: cannot write {e.filename or "the run folder"}: {e.strerror}; the last checkpoint is '
              f'intact{where}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f'--resume {_current_run[0]}' if _current_run else '--resume RUN_DIR'
        print(f'\ninterrupted: the last checkpoint is kept; continue with {where}', file=sys.stderr)
        return 130
    return 0


def load_run_args(run_dir):
    """The args.json a run wrote when it started."""
    path = os.path.join(run_dir, 'args.json')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--resume {run_dir}: cannot read {path} ({e}); is it a run folder?') from None


def saved_args(args, saved, names, parse):
    """A run's saved settings (a dict), with those of `names` that the command line set
    explicitly (differing from the parser's default) taken from `args`."""
    import argparse
    defaults = vars(parse([]))
    modes = ('resume', 'eval_only', 'predict')   # what the command does, not a setting of the run
    fixed = sorted(k for k, v in vars(args).items() if k in defaults and k not in names and k not in modes
                   and v != defaults[k] and v != saved.get(k, defaults[k]))
    if fixed:
        what = '--resume' if getattr(args, 'resume', None) else '--eval_only'
        raise UserError(f'{what} uses the flags the run started with: {", ".join("--" + k for k in fixed)} '
                        f'cannot change ({what} takes {", ".join("--" + n for n in names)}); start a new run '
                        f'with --save to use other settings')
    merged = dict(defaults, **saved)  # flags added since the run started take their defaults
    merged.update({k: getattr(args, k) for k in names if k in defaults and getattr(args, k) != defaults[k]})
    return argparse.Namespace(**merged)


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


def check_save(save):
    """One line now, before any data is read, for a --save that can never be a run folder: a file,
    a path under a file, or a folder that cannot be written (the rest is found by prepare_run_dir)."""
    if save is None:
        return
    if os.path.exists(save) and not os.path.isdir(save):
        raise UserError(f'--save {save}: that is a file, not a folder')
    parent = os.path.dirname(os.path.abspath(save))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f'--save {save}: {parent} is a file, so no folder can be made under it')
    probe = os.path.join(parent, f'.paddle-darts-probe-{os.getpid()}')
    try:  # access(2) says yes to root on /proc and read-only mounts can surprise: try it (and undo it)
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f'--save {save}: cannot create a folder in {parent} ({e.strerror or e})') from None


def prepare_run_dir(save, resume, prefix):
    """The run folder: a new one (refusing to reuse an existing one) or the resumed one.

    Call it only once the data, device and flags have been checked, so a failed start
    leaves nothing behind.  A resumed folder without a checkpoint (a run that stopped
    before its first epoch ended) starts again from the beginning with its saved flags.
    """
    if resume:
        path = resume
    else:
        path = save or os.path.join('runs', time.strftime(f'{prefix}-%Y%m%d-%H%M%S'))
        if os.path.isdir(path) and os.listdir(path):   # (a file or an uncreatable --save: check_save, earlier)
            raise UserError(f'{path} already exists; continue it with --resume {path}, or pick another --save')
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f'--save {path}: cannot create the folder ({e.strerror or e})') from None
    probe = os.path.join(path, '.write-test')
    try:  # a read-only or full disk says so now, not at the first checkpoint
        with open(probe, 'w') as f:
            f.write('x')
        os.remove(probe)
    except OSError as e:
        raise UserError(f'{path}: cannot write into the run folder ({e.strerror or e})') from None
    _current_run[:] = [path]
    return path


_current_run = []  # the run folder of this process, for the interrupt message


class Log:
    """print() that also appends to RUN_DIR/log.txt (file_only: to the file alone)."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, 'log.txt')

    def __call__(self, *parts, end='\n', file_only=False):
        line = ' '.join(str(p) for p in parts)
        if not file_only:
            print(line, end=end, flush=True)
        with open(self.path, 'a') as f:
            f.write(line + ('\n' if end == '\r' else end))


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
