"""Failures a careful user or a fault injector meets: an unusable --save, a full disk,
flags --resume cannot take.  Each is one line, exit 2, and leaves nothing half-written."""
import errno
import json
import os

import numpy as np
import pytest

from darts import errors, files
from conftest import run_script

SCRIPTS = ('train_search.py', 'train.py', 'train_imagenet.py')


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
@pytest.mark.parametrize('script', SCRIPTS)
def test_an_unusable_save_is_one_line(script, tmp_path):
    (tmp_path / 'file').write_text('x')
    for save in (tmp_path / 'file', tmp_path / 'file' / 'run'):
        r = run_script(script, '--save', save, '--data', tmp_path / 'nothing-here')
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and '--save' in err[0] and 'file' in err[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == ['file']


def test_a_save_where_no_folder_can_be_made_is_one_line():
    """/proc: access(2) tells root it may write there, mkdir says otherwise."""
    r = run_script('train_search.py', '--save', '/proc/paddle-darts-run', '--data', '/nonexistent')
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and 'cannot create a folder in /proc' in err[0], r.stderr


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.npz')
    files.save_checkpoint(path, {'w': np.arange(3.0)}, dict(epoch=4))

    def full(f, **arrays):
        f.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(np, 'savez', full)
    with pytest.raises(errors.UserError, match='the disk is full.*previous checkpoint.npz is intact'):
        files.save_checkpoint(path, {'w': np.zeros(3)}, dict(epoch=5))
    assert os.listdir(tmp_path) == ['checkpoint.npz']
    arrays, meta = files.load_checkpoint(path)
    assert meta['epoch'] == 4 and np.array_equal(arrays['w'], np.arange(3.0))
    monkeypatch.undo()
    monkeypatch.setattr(json, 'dumps', lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, 'Read-only')))
    with pytest.raises(errors.UserError, match='cannot write'):
        files.write_json(str(tmp_path / 'args.json'), {})
    assert os.listdir(tmp_path) == ['checkpoint.npz']


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
@pytest.mark.parametrize('script', ('train_search.py', 'train.py'))
def test_resume_refuses_flags_it_would_ignore(script, tmp_path):
    import importlib
    parse = importlib.import_module(script[:-3]).parse_args
    run = tmp_path / 'run'
    run.mkdir()
    saved = vars(parse(['--layers', '5', '--seed', '3']))
    (run / 'args.json').write_text(json.dumps(saved))
    r = run_script(script, '--resume', run, '--learning_rate', '0.5', '--layers', '5', '--seed', '99')
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    # --layers 5 is what the run has: not a change; --learning_rate and --seed are
    assert '--learning_rate, --seed cannot change' in err[0] and '--layers' not in err[0].split('cannot')[0]
    assert sorted(os.listdir(run)) == ['args.json']


BAD_INVOCATIONS = [
    ('train_search.py', '--epochs', '0'), ('train_search.py', '--layers', '1'),
    ('train_search.py', '--primitives', 'none,conv_9x9'), ('train_search.py', '--dataset', 'nosuch'),
    ('train_search.py', '--data', '/nonexistent', '--no_download'), ('train_search.py', '--early_stop', 'plateau:3'),
    ('train_search.py', '--resume', '/nonexistent'), ('train_search.py', '--learning_rate', 'fast'),
    ('train.py', '--arch', 'NOPE'), ('train.py', '--genotype_file', '/nonexistent.json'),
    ('train.py', '--eval_only', '/nonexistent.npz'), ('train.py', '--predict', 'model-only'),
    ('train.py', '--val_fraction', '2'), ('train.py', '--resume', '/nonexistent'),
    ('train_imagenet.py', '--data', '/nonexistent'), ('visualize.py', 'NOPE'),
    ('visualize.py', '--run', '/nonexistent'), ('visualize.py',), ('protocol.py', '--seeds', '3-1'),
]


@pytest.mark.slow
def test_bad_invocations_of_every_script_are_one_line_without_a_traceback(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def run(argv):
        return argv, run_script(*argv, '--save', tmp_path / 'runs' / str(abs(hash(argv))), timeout=300) \
            if argv[0] not in ('visualize.py',) else run_script(*argv, timeout=300)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, BAD_INVOCATIONS))
    for argv, r in results:
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.returncode, r.stderr[-1500:])
        assert 'Traceback' not in r.stdout + r.stderr and len(err) == 1, (argv, r.stderr[-1500:])
    assert not os.path.exists(tmp_path / 'runs')          # and no run folder was made
