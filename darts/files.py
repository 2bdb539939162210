"""Files a run writes whole or not at all: atomic writes, checkpoints, JSON."""
import contextlib
import errno
import json
import os
import threading

import numpy as np

from darts.errors import UserError

# held by atomic_write: a stop (SIGTERM) waits for the write, so the file it replaces stays whole
write_lock = threading.Lock()


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
    except Exception as e:  # noqa: BLE001 - any unreadable file (zip, pickle, JSON) is one line
        raise UserError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e})') from None
    return arrays, meta


def read_json(path, what='', hint='', missing_ok=False):
    """A JSON file the project wrote; unreadable is one UserError line, `WHAT: cannot read PATH (why)HINT`.
    missing_ok: None for a file that is not there."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if missing_ok:
            return None
        error = 'no such file'
    except (OSError, ValueError) as e:
        error = f'{type(e).__name__}: {e}' if isinstance(e, ValueError) else (e.strerror or str(e))
    raise UserError(f'{what + ": " if what else ""}cannot read {path} ({error}){hint}')


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1) + '\n'))
