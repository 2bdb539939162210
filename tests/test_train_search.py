"""train_search.py as a user runs it: a real (tiny) search, resume after kills, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, run_script, write_cifar

TINY = ['--init_channels', '4', '--layers', '3', '--batch_size', '20', '--epochs', '3',
        '--num_workers', '0', '--seed', '5', '--no_download']


def history(run_dir):
    with open(os.path.join(run_dir, 'history.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def reference(cifar_dir, tmp_path_factory):
    """An uninterrupted 3-epoch search, run in this process with the program builder counted."""
    import architect
    import train_search
    calls = []
    real_build = train_search.build_search_programs

    def counting_build(cfg):
        progs = real_build(cfg)
        calls.append({k: architect.count_ops(p) for k, p in progs.programs.items()})
        calls[-1]['_progs'] = progs
        return progs

    run_dir = str(tmp_path_factory.mktemp('search') / 'ref')
    train_search.build_search_programs = counting_build
    try:
        assert train_search.main(['--data', cifar_dir, '--save', run_dir, '--report_freq', '2', *TINY]) == 0
    finally:
        train_search.build_search_programs = real_build
    return run_dir, calls


@pytest.mark.slow
def test_programs_are_built_once_and_never_change(reference):
    run_dir, calls = reference
    assert len(calls) == 1                      # 3 epochs x 5 steps, one build
    progs = calls[0].pop('_progs')
    assert {k: architect_ops(p) for k, p in progs.programs.items()} == calls[0]
    assert len(history(run_dir)) == 3


def architect_ops(p):
    import architect
    return architect.count_ops(p)


@pytest.mark.slow
def test_search_learns_and_writes_its_run_folder(reference):
    run_dir, _ = reference
    h = history(run_dir)
    assert [r['epoch'] for r in h] == [1, 2, 3]
    assert h[-1]['val_acc'] > 0.5, h[-1]['val_acc']       # 4 colour classes: chance is 0.25
    for r in h:
        assert np.allclose(np.sum(r['alpha_normal'], axis=1), 1, atol=1e-4)
        assert len(r['genotype']['normal']) == 8
    import genotypes
    g = genotypes.load(os.path.join(run_dir, 'genotype.json'))
    assert json.loads(genotypes.to_json(g)) == h[-1]['genotype']
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'img/s' in log and 'step 2/5' in log and 'genotype = Genotype(' in log
    args = json.load(open(os.path.join(run_dir, 'args.json')))
    assert args['layers'] == 3 and args['first_order'] is False
    # its pictures are in the folder, and its last lines name the next commands
    for name in ('genotype_normal.png', 'genotype_reduce.png', 'cells.gif', 'curves.png', 'collapse.png'):
        assert os.path.getsize(os.path.join(run_dir, name)) > 1000, name
    tail = log[log.index('done: genotype in'):].splitlines()
    assert tail[1] == 'next:' and 'cells.gif' in tail[2] and 'collapse.png' in tail[2]
    assert tail[3].endswith(f'python train.py --arch {run_dir}/genotype.json --data {args["data"]} --no_download '
                            f'--save {run_dir}-eval')
    assert 'genotype unchanged' in log or log.count('genotype = Genotype(') == 3   # printed when it changes


@pytest.mark.slow
def test_the_search_writes_tensorboard_events_every_epoch(reference):
    from conftest import read_events
    run_dir, _ = reference
    h, events = history(run_dir), read_events(run_dir)
    for key in ('val_acc', 'train_loss', 'lr', 'images_per_sec', 'entropy_normal', 'moved_reduce'):
        assert [(e.step, e.value) for e in events.Scalars(f'epoch/{key}')] == \
            [(r['epoch'], pytest.approx(r[key], rel=1e-6)) for r in h]
    # every 2nd step, and the last
    assert [e.step for e in events.Scalars('step/loss')] == [2, 4, 5, 7, 9, 10, 12, 14, 15]
    for tag in ('alphas', 'cell/normal', 'cell/reduce'):
        images = events.Images(tag)
        assert [im.step for im in images] == [1, 2, 3] and images[0].width > 100, tag



@pytest.mark.slow
def test_visualize_draws_every_picture_of_the_search(reference, tmp_path):
    from conftest import draw_run_pictures
    run_dir, _ = reference
    pictures = draw_run_pictures(run_dir, tmp_path)
    assert list(pictures) == ['genotype_normal.png', 'genotype_reduce.png', 'cells.gif', 'curves.png', 'collapse.png']
    assert pictures['cells.gif'].n_frames == len(history(run_dir)) == 3
    assert pictures['collapse.png'].width <= 1000   # readable at a README's width

def _stop_when(cmd, ready, sig=signal.SIGKILL):
    """Start a search, send it sig once ready(stdout so far) holds; (everything it printed, its
    exit status, seconds from the signal to its end, its processes then: itself and its workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = ''
    deadline = time.time() + 600
    for line in proc.stdout:
        seen += line
        if ready(seen):
            break
        assert time.time() < deadline
    children = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
    t0 = time.time()
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    return seen + rest, proc.returncode, time.time() - t0, [proc.pid, *map(int, children)]


@pytest.mark.slow
def test_resume_after_kills_reaches_the_same_history(reference, cifar_dir, tmp_path):
    """Stopped by SIGTERM while the first step prepares the programs, resumed (from the start),
    killed (SIGKILL) right after epoch 1's checkpoint, resumed, stopped by SIGTERM in the middle of
    epoch 2 (with reader workers), resumed again: the history equals the uninterrupted run's.  SIGTERM
    ends the process and its workers at once, with one line naming the folder to resume."""
    ref_dir, _ = reference
    run_dir = str(tmp_path / 'run')
    cmd = [sys.executable, os.path.join(ROOT, 'train_search.py'), '--data', cifar_dir, '--save', run_dir,
           '--report_freq', '1', *TINY]
    resume = [sys.executable, os.path.join(ROOT, 'train_search.py'), '--resume', run_dir]
    # Paddle's threads started at its import do not block SIGTERM: it once ended the process silently here
    out, rc, took, _ = _stop_when(cmd, lambda s: 'the first step also prepares' in s, signal.SIGTERM)
    assert rc == 143 and took < 5 and out.rstrip().endswith(f'continue with --resume {run_dir}'), (rc, took, out)
    out, _, _, _ = _stop_when(resume, lambda s: 'genotype = ' in s)     # between epochs 1 and 2
    assert 'done' not in out and len(history(run_dir)) == 1
    out, rc, took, pids = _stop_when(resume + ['--num_workers', '1'], lambda s: 'epoch 2/3 step 3/5' in s,
                                     signal.SIGTERM)
    assert rc == 143 and took < 5, (rc, took)
    assert out.rstrip().endswith(f'\nterminated (SIGTERM): the last checkpoint is kept; continue with --resume '
                                 f'{run_dir}') and 'FatalError' not in out and 'Traceback' not in out, out
    assert len(pids) == 3    # the search and its reader workers (one per batch stream), all gone at once
    time.sleep(1)
    assert not [p for p in pids if os.path.exists(f'/proc/{p}') and open(f'/proc/{p}/stat').read().split()[2] != 'Z']
    assert 'resumed from epoch 1' in out and 'done' not in out and len(history(run_dir)) == 1
    r = run_script('train_search.py', '--resume', run_dir)
    assert r.returncode == 0, r.stderr
    assert 'resumed from epoch 1' in r.stdout
    ours, ref = history(run_dir), history(ref_dir)
    assert [x['genotype'] for x in ours] == [x['genotype'] for x in ref]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a['alpha_normal'], b['alpha_normal'], atol=1e-5)
        np.testing.assert_allclose(a['alpha_reduce'], b['alpha_reduce'], atol=1e-5)
        assert abs(a['val_acc'] - b['val_acc']) < 0.02
    from conftest import read_events   # the resumed runs' event files: one curve, each epoch once, the last kept
    events = read_events(run_dir)
    assert [(e.step, e.value) for e in events.Scalars('epoch/val_acc')] == \
        [(x['epoch'], pytest.approx(x['val_acc'], rel=1e-6)) for x in ours]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from darts import files
    path = str(tmp_path / 'checkpoint.npz')
    files.save_checkpoint(path, {'w': np.arange(3.0)}, {'epoch': 0})

    def dies_half_way(f, **arrays):
        f.write(b'PK\x03\x04 partial')
        raise KeyboardInterrupt  # as if killed during the write
    monkeypatch.setattr(np, 'savez', dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        files.save_checkpoint(path, {'w': np.zeros(3)}, {'epoch': 1})
    arrays, meta = files.load_checkpoint(path)
    assert meta['epoch'] == 0 and arrays['w'].tolist() == [0.0, 1.0, 2.0]


def test_missing_data_says_what_is_expected(tmp_path):
    r = run_script('train_search.py', '--data', tmp_path / 'nothing', '--save', tmp_path / 'run', '--no_download')
    assert_one_line_error(r, 'no CIFAR-10 in', 'data_batch_1', 'cifar-10-python.tar.gz')


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_offline_download_fails_cleanly(tmp_path):
    # a port on this machine where nothing listens: the download fails at once
    r = run_script('train_search.py', '--data', tmp_path / 'd', '--save', tmp_path / 'run',
                   '--data_url', 'http://127.0.0.1:9/cifar-10-python.tar.gz')
    assert_one_line_error(r, 'downloading it failed')
    assert not os.path.exists(tmp_path / 'd' / 'cifar-10-python.tar.gz.part')


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_truncated_batch_file(tmp_path):
    folder = write_cifar(str(tmp_path / 'c'))
    path = os.path.join(folder, 'data_batch_3')
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[: len(raw) // 2])
    r = run_script('train_search.py', '--data', tmp_path / 'c', '--save', tmp_path / 'run', '--no_download')
    assert_one_line_error(r, 'data_batch_3', 'not a readable CIFAR-10 batch')


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_corrupt_archive(tmp_path):
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'cifar-10-python.tar.gz').write_bytes(b'\x1f\x8b garbage')
    r = run_script('train_search.py', '--data', tmp_path / 'c', '--save', tmp_path / 'run', '--no_download')
    assert_one_line_error(r, 'not a readable tar.gz')


@pytest.mark.skipif(__import__('paddle').is_compiled_with_cuda(), reason='this Paddle has CUDA')
@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_gpu_requested_without_cuda(cifar_dir, tmp_path):
    r = run_script('train_search.py', '--data', cifar_dir, '--save', tmp_path / 'run', '--device', 'gpu', *TINY)
    assert_one_line_error(r, '--device gpu', '--device cpu')


@pytest.mark.skipif(not __import__('paddle').is_compiled_with_cuda(), reason='this Paddle has no CUDA')
def test_gpu_is_selected_where_cuda_exists():
    import paddle
    from darts import distributed, errors
    if paddle.device.cuda.device_count() == 0:
        with pytest.raises(errors.UserError, match='sees no GPU'):
            distributed.select_place('gpu')
    else:
        assert isinstance(distributed.select_place('gpu'), paddle.CUDAPlace)
        assert isinstance(distributed.select_place('auto'), paddle.CUDAPlace)
    assert isinstance(distributed.select_place('cpu'), paddle.CPUPlace)


def test_batch_larger_than_split(cifar_dir, tmp_path):
    r = run_script('train_search.py', '--data', cifar_dir, '--save', tmp_path / 'run', '--batch_size', '500',
                   '--no_download')
    assert_one_line_error(r, '--batch_size 500', '100 train / 100 val')


@pytest.mark.slow
def test_existing_run_dir_is_not_overwritten(cifar_dir, tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'log.txt').write_text('precious\n')
    r = run_script('train_search.py', '--data', cifar_dir, '--save', run_dir, *TINY)
    assert_one_line_error(r, 'already exists', '--resume')
    assert (run_dir / 'log.txt').read_text() == 'precious\n'
    assert sorted(os.listdir(run_dir)) == ['log.txt']


def test_bad_flag_value():
    r = run_script('train_search.py', '--epochs', '0')
    assert r.returncode == 2 and '--epochs must be at least 1' in r.stderr


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    r = run_script('train_search.py', '--resume', tmp_path)
    assert_one_line_error(r, 'is it a run folder')


@pytest.mark.slow
def test_a_failed_start_leaves_no_folder_and_a_folder_without_checkpoint_resumes(cifar_dir, tmp_path):
    r = run_script('train_search.py', '--data', tmp_path / 'nothing', '--save', tmp_path / 'bad', '--no_download')
    assert_one_line_error(r, 'no CIFAR-10 in')
    assert not os.path.exists(tmp_path / 'bad')          # validated before the folder is made
    # a run killed before its first checkpoint: args.json and a log line, nothing else
    import train_search
    run_dir = tmp_path / 'early'
    run_dir.mkdir()
    saved = vars(train_search.parse_args(['--data', cifar_dir, '--save', str(run_dir), *TINY, '--epochs', '1']))
    (run_dir / 'args.json').write_text(json.dumps(saved))
    (run_dir / 'log.txt').write_text('programs built\n')
    r = run_script('train_search.py', '--data', cifar_dir, '--save', run_dir, *TINY)
    assert_one_line_error(r, 'already exists', f'--resume {run_dir}')
    r = run_script('train_search.py', '--resume', run_dir)
    assert r.returncode == 0, r.stderr
    assert 'starting from the beginning' in r.stdout
    assert [x['epoch'] for x in history(str(run_dir))] == [1]


@pytest.mark.slow
def test_resume_rewrites_what_a_late_kill_left_stale(reference, tmp_path):
    """Killed after the last checkpoint but before genotype.json (and during a history append):
    --resume rewrites both from the checkpoint instead of reporting a stale genotype."""
    import shutil
    import genotypes
    run_dir, _ = reference
    copy = str(tmp_path / 'copy')
    shutil.copytree(run_dir, copy)
    genotypes.save(genotypes.DARTS_V1, os.path.join(copy, 'genotype.json'))
    with open(os.path.join(copy, 'history.jsonl'), 'a') as f:
        f.write('{"epoch": 4, "train_lo')
    os.remove(os.path.join(copy, 'result.json'))
    r = run_script('train_search.py', '--resume', copy)
    assert r.returncode == 0, r.stderr
    h = history(copy)
    assert len(h) == 3
    assert json.loads(genotypes.to_json(genotypes.load(os.path.join(copy, 'genotype.json')))) == h[-1]['genotype']
    assert json.load(open(os.path.join(copy, 'result.json')))['genotype'] == h[-1]['genotype']


def test_the_last_lines_name_the_command_that_trains_the_cell_on_the_same_data():
    import train_search
    args = train_search.parse_args(['--dataset', 'digits', '--image_size', '16', '--epochs', '2', '--nodes', '3'])
    lines = train_search.next_steps(args, 'runs/demo', [])
    assert lines[1].strip() == 'draw the cells and the search: python visualize.py --run runs/demo'
    assert lines[2].strip() == ('train the cell found: python train.py --arch runs/demo/genotype.json --dataset digits '
                                '--image_size 16 --save runs/demo-eval')   # the data flags, not the search's
