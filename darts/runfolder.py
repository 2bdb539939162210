"""A run's life on disk, the same for a search (train_search.py) and a training (training.py):

    args = runfolder.start(args, 'search', RESUMABLE, parse_args)   # flags of a new or resumed run,
                                                                    # --save checked before data is read
    run = runfolder.Run.open(args, 'search')   # once data and programs are ready: the folder, log.txt, args.json
    state, history, start = run.restore(initial_state, args.epochs) # the last checkpoint, if any
    run.end_epoch(arrays, history, **meta)     # checkpoint.npz (atomic), then a history.jsonl line
    run.write_json('result.json', {...})

The folder holds args.json (the flags it started with), data.json, log.txt, checkpoint.npz
(every persistable tensor, the epoch and the history so far) and history.jsonl (one line
per epoch, rewritten from the checkpoint on resume, so a kill between the two writes leaves
no epoch the checkpoint does not have).  A resumed folder without a checkpoint (stopped
before its first epoch ended) starts again from the beginning with its saved flags.

writer=False (every rank but the first of a data-parallel job): the same calls read what
they need and write nothing, print nothing.
"""
import argparse
import json
import os
import time

import numpy as np

from darts import files, lifecycle
from darts.errors import UserError


def start(args, kind, resumable, parse):
    """The flags of the run: args itself for a new run (after checking --save, before any data
    is read), or for --resume RUN_DIR the flags RUN_DIR started with, with those in `resumable`
    that the command line sets.  kind: 'search' or 'train', what RUN_DIR must be."""
    if not args.resume:
        check_save(args.save)
        return args
    resume = args.resume
    saved = load_run_args(resume)
    found = 'train' if 'arch' in saved else 'search'
    if found != kind:
        raise UserError(f'--resume {resume}: that is a search run (train_search.py --resume {resume}); train its '
                        f'cell with --genotype_file {os.path.join(resume, "genotype.json")}' if found == 'search' else
                        f'--resume {resume}: that is a training run; continue it with train.py --resume {resume}')
    args = saved_args(args, saved, resumable, parse)
    args.resume = resume
    return args


def load_run_args(run_dir):
    """The args.json a run wrote when it started."""
    return files.read_json(os.path.join(run_dir, 'args.json'), f'--resume {run_dir}', '; is it a run folder?')


def saved_args(args, saved, names, parse):
    """A run's saved settings (a dict), with those of `names` that the command line set
    explicitly (differing from the parser's default) taken from `args`."""
    defaults = vars(parse([]))
    modes = ('resume', 'eval_only', 'predict', 'export_onnx')   # what the command does, not a setting of the run
    fixed = sorted(k for k, v in vars(args).items() if k in defaults and k not in names and k not in modes
                   and v != defaults[k] and v != saved.get(k, defaults[k]))
    if fixed:
        what = next((f'--{m}' for m in modes if getattr(args, m, None)), '--eval_only')
        raise UserError(f'{what} uses the flags the run started with: {", ".join("--" + k for k in fixed)} '
                        f'cannot change ({what} takes {", ".join("--" + n for n in names)}); start a new run '
                        f'with --save to use other settings')
    merged = dict(defaults, **saved)  # flags added since the run started take their defaults
    merged.update({k: getattr(args, k) for k in names if k in defaults and getattr(args, k) != defaults[k]})
    return argparse.Namespace(**merged)


def check_save(save):
    """One line now, before any data is read or a program built, for a --save that cannot be a new
    run folder: a file, a folder that holds something, a path under a file, or a folder that cannot
    be written (a race with another process is found by Run.open)."""
    if save is None:
        return
    if os.path.exists(save) and not os.path.isdir(save):
        raise UserError(f'--save {save}: that is a file, not a folder')
    _refuse_occupied(save)
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


def _refuse_occupied(path):
    """One line for a folder that already holds something: a run folder is never reused."""
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f'{path} already exists; continue it with --resume {path}, or pick another --save')


def _make_folder(save, prefix):
    """A new run folder (refusing to reuse one that holds anything): --save, or runs/PREFIX-DATE-TIME."""
    path = save or os.path.join('runs', time.strftime(f'{prefix}-%Y%m%d-%H%M%S'))
    _refuse_occupied(path)   # again: another process may have made it since check_save (a file: check_save)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f'--save {path}: cannot create the folder ({e.strerror or e})') from None
    return path


def _check_writable(path):
    probe = os.path.join(path, '.write-test')
    try:  # a read-only or full disk says so now, not at the first checkpoint
        with open(probe, 'w') as f:
            f.write('x')
        os.remove(probe)
    except OSError as e:
        raise UserError(f'{path}: cannot write into the run folder ({e.strerror or e})') from None


class Run:
    """An open run folder (see the module docstring)."""

    CHECKPOINT, HISTORY = 'checkpoint.npz', 'history.jsonl'

    def __init__(self, path, writer=True):
        self.path, self.writer = path, writer
        self.resumed, self.world = False, None
        lifecycle.current_run[:] = [self]

    @classmethod
    def open(cls, args, prefix, world=None):
        """The run folder of args (new: made, args.json written; --resume: reopened).  Call it only
        once data, device and flags have been checked, so a failed start leaves nothing behind.
        world (distributed.World): its writer makes the folder and tells the other ranks its name."""
        writer = world is None or world.writer
        path = None
        if writer:
            path = args.resume or _make_folder(args.save, prefix)
            _check_writable(path)
        if world is not None:
            path = world.share('run folder', path)
        run = cls(path, writer)
        run.world = world
        run.resumed = bool(args.resume)
        if not args.resume:
            run.write_json('args.json', vars(args))
        return run

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, *parts, end='\n', file_only=False):
        """print() that also appends to log.txt (file_only: to the file alone)."""
        if not self.writer:
            return
        line = ' '.join(str(p) for p in parts)
        if not file_only:
            print(line, end=end, flush=True)
        with open(self.file('log.txt'), 'a') as f:
            f.write(line + ('\n' if end == '\r' else end))

    def write_json(self, name, obj):
        if self.writer:
            files.write_json(self.file(name), obj)

    def save_checkpoint(self, arrays, meta, name=CHECKPOINT):
        if self.writer:
            files.save_checkpoint(self.file(name), arrays, meta)

    def restore(self, state, epochs, exe=None):
        """(state, history, start epoch, checkpoint meta): the last checkpoint's if there is one, after
        checking it holds the tensors of `state` with their shapes (and, in a data-parallel job, that
        every rank read the same one: exe runs that check); else (state, [], 0, {})."""
        path = self.file(self.CHECKPOINT)
        found = self.resumed and os.path.isfile(path)
        arrays, meta = files.load_checkpoint(path) if found else (state, dict(epoch=-1, history=[]))
        if set(arrays) != set(state) or any(arrays[k].shape != state[k].shape for k in state):
            raise UserError(f'{path} does not match this network (different flags?)')
        if self.world is not None and self.world.size > 1:
            self.world.barrier('start')   # the ranks read data and built programs at their own pace
            checksum = sum(float(np.sum(a, dtype=np.float64)) for a in arrays.values())
            self.world.check_same(exe, 'checkpoints (epoch, checksum)', [meta['epoch'], checksum])
        if not found:
            if self.resumed:
                self.log('no checkpoint yet: starting from the beginning with the saved flags')
            return state, [], 0, {}
        ran_with = meta.get('processes', 1)
        if self.world is not None and ran_with != self.world.size:
            self.log(f'note: this run ran with {ran_with} process(es) and continues with {self.world.size}: the '
                     f'global batch is the same, the per-process batch-norm statistics are not, so its history '
                     f'will differ a little from a run with one count throughout')
        history = meta['history']
        # what a kill after the checkpoint may have left stale or half-written is rewritten from it
        if self.writer:
            files.atomic_write(self.file(self.HISTORY), lambda f: f.writelines(json.dumps(r) + '\n'
                                                                              for r in history))
        self.log(f'resumed from epoch {meta["epoch"] + 1} of {epochs}')
        return arrays, history, meta['epoch'] + 1, meta

    def end_epoch(self, arrays, history, **meta):
        """The epoch's checkpoint (every tensor, the history so far, meta), then its history line."""
        processes = 1 if self.world is None else self.world.size
        self.save_checkpoint(arrays, dict(epoch=history[-1]['epoch'] - 1, history=history, processes=processes,
                                          **meta))
        if self.writer:
            with open(self.file(self.HISTORY), 'a') as f:
                f.write(json.dumps(history[-1]) + '\n')
