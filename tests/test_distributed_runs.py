"""The scripts under Paddle's launcher as a user runs them: a 2-process search (as two "nodes")
against one process; the same search stopped in every way a job is stopped, and resumed, against
the uninterrupted one; a 2-process train.py of its cell and --predict; bad input.  (SIGTERM to a
one-process search: tests/test_train_search.py.)"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_script

# every test here runs Paddle's distributed launcher (two processes through gloo)
pytestmark = pytest.mark.slow

# second order on the digits: 2 epochs of 12 steps at batch 64, a network of 2 cells of 2 nodes
# (small programs: each start of a job builds and prepares them, about 20 s)
FLAGS = ['--dataset', 'digits', '--image_size', '16', '--epochs', '2', '--layers', '2', '--init_channels', '4',
         '--nodes', '2', '--batch_size', '64', '--learning_rate', '0.3', '--num_workers', '2', '--report_freq', '3',
         '--seed', '3']
LAUNCH = [sys.executable, '-m', 'paddle.distributed.launch']


def history(run_dir):
    with open(os.path.join(run_dir, 'history.jsonl')) as f:
        return [json.loads(line) for line in f]


def same_history(ours, ref):
    """Equal in every figure but the timings."""
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert {k: v for k, v in a.items() if k not in ('epoch_time', 'images_per_sec')} == \
               {k: v for k, v in b.items() if k not in ('epoch_time', 'images_per_sec')}, a['epoch']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Job:
    """A launcher command in its own session (as a terminal's foreground job), its ranks, its logs."""

    def __init__(self, script, args, log_dir, launcher_flags=('--nproc_per_node', '2')):
        self.log_dir = str(log_dir)
        cmd = LAUNCH + [*launcher_flags, '--log_dir', self.log_dir, os.path.join(ROOT, script), *map(str, args)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def log(self, rank=0):
        try:
            with open(os.path.join(self.log_dir, f'workerlog.{rank}')) as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def wait_for(self, text, timeout=400):
        deadline = time.time() + timeout
        while text not in self.log(0):
            assert self.proc.poll() is None, f'the job ended before {text!r}:\n{self.log(0)}'
            assert time.time() < deadline, f'no {text!r} in {timeout} s:\n{self.log(0)}'
            time.sleep(0.2)

    def ranks(self):
        """{rank: pid} of the launcher's children."""
        out = {}
        for pid in _children(self.proc.pid):
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(e.split(b'=', 1) for e in f.read().split(b'\0') if b'=' in e)
            if b'PADDLE_TRAINER_ID' in env:
                out[int(env[b'PADDLE_TRAINER_ID'])] = pid
        return out

    def processes(self):
        """Every process of the job: the launcher, its ranks, their reader workers."""
        pids = {self.proc.pid}
        for pid in list(self.ranks().values()):
            pids |= {pid, *_children(pid)}
        return pids

    def finish(self, timeout=600):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def _children(pid):
    r = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def _running(pids):
    alive = []
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().split()[2] != 'Z':
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def stop(job, how, sig, when):
    """Once `when` is in rank 0's log, send sig to the launcher's group (a terminal's Ctrl-C), the
    launcher, or one rank; the job must end within seconds, every process of it, with one line of
    rank 0 on the launcher's console and no Paddle C++ block anywhere."""
    job.wait_for(when)
    pids = job.processes()
    target = job.ranks()[int(how[-1])] if how.startswith('rank') else job.proc.pid
    t0 = time.time()
    if how == 'group':
        os.killpg(job.proc.pid, sig)
    else:
        os.kill(target, sig)
    rc, out, err = job.finish(timeout=60)
    took = time.time() - t0
    assert rc != 0 and took < 15, (rc, took)
    time.sleep(2)
    assert not _running(pids), f'still running: {_running(pids)}'
    console = out + err
    assert 'FatalError' not in console + job.log(0) + job.log(1), console
    ours = [line for line in console.splitlines() if 'LAUNCH' not in line and 'continue with --resume' in line]
    assert len(ours) == 1, console
    return rc, ours[0]


@pytest.fixture(scope='module')
def two_nodes(tmp_path_factory):
    """The reference: one uninterrupted 2-process search, run as two launcher commands ("nodes" of one
    process each) that meet at a --master address."""
    root = tmp_path_factory.mktemp('nodes')
    run_dir, port = root / 'run', free_port()
    nodes = [Job('train_search.py', [*FLAGS, '--save', run_dir], root / f'log{k}',
                 ('--nnodes', '2', '--master', f'127.0.0.1:{port}', '--nproc_per_node', '1')) for k in range(2)]
    results = [node.finish() for node in nodes]
    for (rc, out, err), node in zip(results, nodes):
        assert rc == 0, out[-2000:] + err[-2000:] + node.log(0)
    return str(run_dir), results


def test_two_nodes_run_one_search_and_write_one_run_folder(two_nodes):
    run_dir, results = two_nodes
    h = history(run_dir)
    assert [r['epoch'] for r in h] == [1, 2]
    assert h[-1]['val_acc'] > 0.2, h[-1]['val_acc']        # ten digits: chance is 0.1
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert log.count('run folder ') == 1 and log.count('epoch 2/2 lr') == 1      # written once
    assert '2 processes (gloo' in log
    assert json.load(open(os.path.join(run_dir, 'result.json')))['genotype'] == h[-1]['genotype']
    ckpt = np.load(os.path.join(run_dir, 'checkpoint.npz'))
    assert json.loads(str(ckpt['__meta__']))['processes'] == 2


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    """The same search in one plain process."""
    import train_search
    run_dir = str(tmp_path_factory.mktemp('single') / 'run')
    assert train_search.main([*FLAGS, '--save', run_dir]) == 0
    return run_dir


def test_two_processes_reach_what_one_process_reaches(two_nodes, one_process):
    """Not the same numbers (batch-norm statistics are per process), the same kind of result."""
    two, one = history(two_nodes[0]), history(one_process)
    assert abs(two[-1]['train_loss'] - one[-1]['train_loss']) < 0.25 * one[-1]['train_loss']
    assert abs(two[-1]['val_acc'] - one[-1]['val_acc']) < 0.2


def test_a_stopped_and_resumed_2_process_search_is_the_uninterrupted_one(two_nodes, tmp_path):
    """One node of 2 processes: SIGTERM to the launcher while the first step prepares the programs;
    resumed (from the start: no checkpoint yet); SIGTERM to rank 1, Ctrl-C to the launcher's group,
    kill -9 of rank 1, each in epoch 2 and each resumed: the history equals the uninterrupted
    two-node run's, figure for figure."""
    run_dir = str(tmp_path / 'run')
    first = Job('train_search.py', [*FLAGS, '--save', run_dir], tmp_path / 'log0')
    first.wait_for('the first step also prepares the programs')
    time.sleep(1)
    rc, line = stop(first, 'launcher', signal.SIGTERM, 'the first step also prepares the programs')
    assert rc == 15 and line == f'terminated (SIGTERM): the last checkpoint is kept; continue with --resume {run_dir}'
    assert not os.path.exists(os.path.join(run_dir, 'checkpoint.npz'))
    for k, (how, sig, when) in enumerate([('rank1', signal.SIGTERM, 'epoch 2/2 step 3/'),
                                          ('group', signal.SIGINT, 'epoch 2/2 step 6/'),
                                          ('rank1', signal.SIGKILL, 'epoch 2/2 step 9/')], 1):
        job = Job('train_search.py', ['--resume', run_dir], tmp_path / f'log{k}')
        rc, line = stop(job, how, sig, when)
        # the launcher's status is rank 0's: 143 when the launcher stopped it, 2 when a collective failed
        # first; Ctrl-C: the launcher's own 2 (its SIGINT)
        assert rc in ((2,) if how == 'group' else (2, 143)), rc
        assert run_dir in line
        assert [r['epoch'] for r in history(run_dir)] == [1]    # the epoch in the checkpoint, nothing more
    r = subprocess.run(LAUNCH + ['--nproc_per_node', '2', '--log_dir', str(tmp_path / 'log9'),
                                 os.path.join(ROOT, 'train_search.py'), '--resume', run_dir],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    same_history(history(run_dir), history(two_nodes[0]))


def test_train_py_on_two_processes_then_predict(two_nodes, tmp_path):
    """train.py of the found cell on two processes (auxiliary head, drop path), its exported model
    classifying image files."""
    from PIL import Image
    from sklearn.datasets import load_digits
    genotype = os.path.join(two_nodes[0], 'genotype.json')   # a cell of 2 nodes
    run_dir = tmp_path / 'train'
    r = subprocess.run(LAUNCH + ['--nproc_per_node', '2', '--log_dir', str(tmp_path / 'log'),
                                 os.path.join(ROOT, 'train.py'), '--genotype_file', genotype, '--dataset', 'digits',
                                 '--image_size', '16', '--epochs', '2', '--layers', '2', '--init_channels', '4',
                                 '--batch_size', '64', '--cutout_length', '4', '--num_workers', '2',
                                 '--save', run_dir], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    h = history(run_dir)
    assert [x['epoch'] for x in h] == [1, 2] and h[-1]['drop_prob'] > 0
    log = open(run_dir / 'log.txt').read()
    assert log.count('epoch 2/2 lr') == 1 and '2 processes (gloo' in log
    result = json.load(open(run_dir / 'result.json'))
    confusion = json.load(open(run_dir / 'confusion.json'))
    assert np.sum(confusion['matrix']) == 300                  # every test image, counted once
    # no hold-out: the run delivers the last epoch, never one chosen on the test split
    assert (result['top1'], result['epoch'], result['chosen']) == (h[-1]['val_acc'], 2, 'the last epoch')
    digits = load_digits()
    paths = []
    for k in range(3):
        path = tmp_path / f'digit{k}.png'
        Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(path)
        paths.append(str(path))
    p = run_script('train.py', '--predict', run_dir / 'inference' / 'model', *paths)
    assert p.returncode == 0, p.stderr
    rows = [line.split('\t') for line in p.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == paths and all(row[1] in '0123456789' and 0 < float(row[2]) <= 1
                                                     for row in rows)


@pytest.mark.parametrize('flags, message', [
    (['--data', '/nonexistent', '--no_download'], 'no CIFAR-10 in /nonexistent'),
    (['--dataset', 'digits', '--batch_size', '31'], '--batch_size 31 is the global batch and must be a multiple of '
                                                    'the 2 processes'),
])
def test_bad_input_under_the_launcher_is_one_line_and_leaves_nothing(flags, message, tmp_path):
    job = Job('train_search.py', [*flags, '--save', tmp_path / 'run'], tmp_path / 'log')
    t0 = time.time()
    rc, out, err = job.finish(timeout=120)
    assert rc == 2 and time.time() - t0 < 60
    for rank in (0, 1):
        lines = [line for line in job.log(rank).splitlines() if line.strip()]
        assert lines == [f'error: {message}' + lines[0].split(message, 1)[1]], lines
    assert message in out + err
    assert not os.path.exists(tmp_path / 'run')
