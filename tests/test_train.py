"""train.py: evaluation training of a genotype, as a user runs it, and its programs."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest

import genotypes
from conftest import ROOT, assert_one_line_error, onnx_paddle_and_test_program, run_script

TINY = ['--arch', 'DARTS_V2', '--init_channels', '8', '--layers', '3', '--batch_size', '20', '--epochs', '3',
        '--num_workers', '0', '--seed', '1', '--no_download', '--report_freq', '2', '--learning_rate', '0.05']


def history(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, 'history.jsonl'))]


@pytest.fixture(scope='module')
def reference(cifar_dir, tmp_path_factory):
    """3 epochs in this process, counting program builds."""
    import train
    from darts import training
    calls, real = [], training.build_programs

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    run_dir = str(tmp_path_factory.mktemp('eval') / 'ref')
    training.build_programs = counting
    try:
        assert train.main(['--data', cifar_dir, '--save', run_dir, *TINY]) == 0
    finally:
        training.build_programs = real
    return run_dir, calls


@pytest.mark.slow
def test_built_once_learns_and_logs(reference):
    run_dir, calls = reference
    assert calls == [1]
    h = history(run_dir)
    assert [r['epoch'] for r in h] == [1, 2, 3]
    assert [round(r['drop_prob'], 6) for r in h] == [0.0, round(0.2 / 3, 6), round(0.4 / 3, 6)]
    assert max(r['val_acc'] for r in h) > 0.5        # 4 colour classes: chance 0.25
    assert all(r['val_top5'] >= r['val_acc'] for r in h)
    # no hold-out: the run delivers its last epoch (nothing is chosen on the test split)
    from darts import files
    _, meta = files.load_checkpoint(os.path.join(run_dir, 'best.npz'))
    result = json.load(open(os.path.join(run_dir, 'result.json')))
    assert meta['epoch'] == 2 and (result['epoch'], result['top1']) == (3, h[-1]['val_acc'])
    assert result['chosen'] == 'the last epoch' and 'best_top1' not in result
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert f'done: test top-1 {100 * h[-1]["val_acc"]:.2f}% at the last epoch (3;' in log and '(best ' not in log
    assert result['parameters'] < 1e6 and f'{result["parameters"]:,} parameters (auxiliary' in log   # exact
    assert all(os.path.isfile(os.path.join(run_dir, name)) for name in ('curves.png', 'confusion.png'))
    # what was trained is recorded, whatever --arch named
    assert genotypes.from_dict(json.load(open(os.path.join(run_dir, 'args.json')))['genotype']) == genotypes.DARTS_V2


@pytest.mark.slow
@pytest.mark.parametrize('form', ['text', 'file'])
def test_a_genotype_as_text_or_file_trains_the_network_its_name_does(reference, cifar_dir, tmp_path, form):
    """The log's Genotype(...) text and a genotype file train what --arch DARTS_V2 trains: the
    first epoch (its lr and drop path do not depend on --epochs) equals the reference's."""
    spec = 'genotype = ' + str(genotypes.DARTS_V2)
    if form == 'file':
        spec = str(tmp_path / 'g.json')
        genotypes.save(genotypes.DARTS_V2, spec)
    flags = list(TINY)
    flags[flags.index('--arch') + 1] = spec
    flags[flags.index('--epochs') + 1] = '1'
    r = run_script('train.py', '--data', cifar_dir, '--save', tmp_path / 'r', *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    first, = history(tmp_path / 'r')
    want = history(reference[0])[0]
    assert (first['train_loss'], first['val_acc']) == (want['train_loss'], want['val_acc'])
    saved = json.load(open(tmp_path / 'r' / 'args.json'))
    assert saved['arch'] == spec and genotypes.from_dict(saved['genotype']) == genotypes.DARTS_V2


def test_the_three_genotype_forms_resolve_alike_and_a_call_in_the_text_is_refused(tmp_path):
    import train
    from darts import training
    path = tmp_path / 'g.json'
    genotypes.save(genotypes.DARTS_V1, str(path))
    forms = [['--arch', 'DARTS_V1'], ['--arch', str(genotypes.DARTS_V1)], ['--arch', str(path)],
             ['--genotype_file', str(path)]]
    assert all(training.load_genotype(train.parse_args(f)) == genotypes.DARTS_V1 for f in forms)
    assert train.parse_args([]).arch == 'DARTS_V2'     # the cell the paper's CIFAR-10 figures are for
    marker = tmp_path / 'ran'
    text = str(genotypes.DARTS_V1).replace("normal_concat=[2, 3, 4, 5]",
                                           f"normal_concat=__import__('os').system('touch {marker}')")
    r = run_script('train.py', '--arch', text, '--save', tmp_path / 'r')
    assert_one_line_error(r, 'refused a call')
    assert not marker.exists() and not (tmp_path / 'r').exists()


@pytest.mark.slow
def test_training_writes_tensorboard_events_every_epoch_and_the_confusion_matrix(reference):
    from conftest import read_events
    run_dir, _ = reference
    h, events = history(run_dir), read_events(run_dir)
    for key in ('val_acc', 'train_loss', 'lr', 'drop_prob', 'images_per_sec'):
        assert [(e.step, e.value) for e in events.Scalars(f'epoch/{key}')] == \
            [(r['epoch'], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in h]
    assert len(events.Scalars('step/top1')) >= 3
    assert [im.step for im in events.Images('confusion')] == [len(h)]   # the epoch delivered: the last



@pytest.mark.slow
def test_visualize_draws_every_picture_of_the_training_run(reference, tmp_path):
    import visualize
    from conftest import draw_run_pictures
    run_dir, _ = reference
    assert list(draw_run_pictures(run_dir, tmp_path)) == ['curves.png', 'confusion.png']
    best = max(history(run_dir), key=lambda r: r['val_acc'])    # the matrix is the best epoch's, on the test split
    confusion = visualize.read_confusion(os.path.join(run_dir, 'confusion.json'))
    assert f'accuracy {100 * best["val_acc"]:.1f}%' in visualize.confusion_figure(confusion)._suptitle.get_text()

@pytest.mark.slow
def test_eval_only_reproduces_the_logged_accuracy(reference):
    run_dir, _ = reference
    best = max(history(run_dir), key=lambda r: r['val_acc'])
    r = run_script('train.py', '--eval_only', os.path.join(run_dir, 'best.npz'))
    assert r.returncode == 0, r.stderr
    assert f'top1 {100 * best["val_acc"]:.2f}%' in r.stdout and f'top5 {100 * best["val_top5"]:.2f}%' in r.stdout


@pytest.mark.slow
def test_resume_continues_with_the_same_schedule(reference, cifar_dir, tmp_path):
    ref_dir, _ = reference
    run_dir = str(tmp_path / 'run')
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--data', cifar_dir, '--save', run_dir, *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith('epoch 1/3 lr'):   # epoch 1 summary: its checkpoint is written
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert len(history(run_dir)) == 1
    r = run_script('train.py', '--resume', run_dir)
    assert r.returncode == 0, r.stderr
    ours, ref = history(run_dir), history(ref_dir)
    assert [x['lr'] for x in ours] == [x['lr'] for x in ref]
    assert [x['drop_prob'] for x in ours] == [x['drop_prob'] for x in ref]
    # drop path (0.2 here) draws from (seed, epoch, step): the resumed run is the uninterrupted one
    for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc'):
        assert [x[key] for x in ours] == [x[key] for x in ref], key


def _programs(auxiliary_weight=0.4):
    import train
    from darts import training
    paddle.enable_static()
    args = train.parse_args(['--init_channels', '4', '--layers', '3', '--auxiliary_weight', str(auxiliary_weight)])
    return training, training.build_programs(genotypes.DARTS_V2, args, image_size=32)


def _run(train, progs, state, fetch, program, **feed):
    from darts.tensors import set_tensors
    scope, place = paddle.static.Scope(), paddle.CPUPlace()
    with paddle.static.scope_guard(scope):
        set_tensors(scope, place, state)
        return paddle.static.Executor(place).run(program, feed=feed, fetch_list=fetch)


def test_drop_path_probability_is_fed_and_auxiliary_loss_is_weighted():
    train, progs = _programs()
    state = train.initial_state(progs['layout'], 0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3, 32, 32)).astype('float32'), rng.integers(0, 10, 8)
    ops = len(progs['train'].global_block().ops)

    import model
    # 3 cells: normal, reduction, reduction; drop path on every op but an identity skip (stride 1)
    g = genotypes.DARTS_V2
    normal = sum(op != 'skip_connect' for op, _ in g.normal)
    reduce = sum(not (op == 'skip_connect' and j >= 2) for op, j in g.reduce)
    assert progs['drop_sites'] == normal + 2 * reduce == 16

    def losses(drop, step=0):
        noise = model.drop_noise(0, 0, step, progs['drop_sites'], 8)
        return _run(train, progs, state, progs['train_fetch'], progs['train'], x=x, y=y,
                    lr=np.array([0.0], 'float32'), drop_prob=np.array([drop], 'float32'), drop_noise=noise)
    main0, _, total0 = losses(0.0)
    main_drop, _, _ = losses(0.9)
    assert float(main0) != pytest.approx(float(main_drop), rel=1e-3)   # the fed value acts
    assert float(losses(0.5)[0]) == float(losses(0.5)[0])              # the same draws, the same loss
    assert float(losses(0.5)[0]) != float(losses(0.5, step=1)[0])      # another step, other draws
    assert len(progs['train'].global_block().ops) == ops               # ... without rebuilding
    # total = CE(main) + 0.4 * CE(aux): recover CE(aux) from a program with weight 0 vs 0.4
    train0, progs0 = _programs(auxiliary_weight=0.0)
    _, _, total_w0 = _run(train0, progs0, state, progs0['train_fetch'], progs0['train'], x=x, y=y,
                          lr=np.array([0.0], 'float32'), drop_prob=np.array([0.0], 'float32'),
                          drop_noise=model.drop_noise(0, 0, 0, progs0['drop_sites'], 8))
    assert float(total_w0) == pytest.approx(float(main0), rel=1e-5)
    aux_ce = (float(total0) - float(main0)) / 0.4
    assert 1.0 < aux_ce < 5.0          # a cross-entropy over 10 classes near initialisation


def test_auxiliary_head_is_absent_from_evaluation():
    train, progs = _programs()
    layout = progs['layout']
    state = train.initial_state(layout, 0)
    off = 0
    for name, size in zip(layout.names, layout.sizes):   # poison the auxiliary head's weights
        if name.startswith('auxiliary'):
            state['weights'][off:off + size] = np.nan
        off += size
    x, y = np.zeros((4, 3, 32, 32), 'float32'), np.zeros(4, 'int64')
    test_loss, logits = _run(train, progs, state, progs['test_fetch'], progs['test'], x=x, y=y)
    assert np.all(np.isfinite(logits))
    import model
    _, _, total = _run(train, progs, state, progs['train_fetch'], progs['train'], x=x, y=y,
                       lr=np.array([0.0], 'float32'), drop_prob=np.array([0.0], 'float32'),
                       drop_noise=model.drop_noise(0, 0, 0, progs['drop_sites'], 4))
    assert np.isnan(total)              # ... while training does use it


def test_unknown_arch_lists_names(tmp_path):
    r = run_script('train.py', '--arch', 'RESNET', '--save', tmp_path / 'r')
    assert r.returncode == 2 and 'DARTS_V1, DARTS_V2, DARTS_PADDLE' in r.stderr
    assert not os.path.exists(tmp_path / 'r')


def test_bad_genotype_file_says_what_is_wrong(tmp_path):
    path = tmp_path / 'g.json'
    path.write_text(json.dumps({'normal': [['sep_conv_3x3', 0]] * 8}))
    r = run_script('train.py', '--genotype_file', path, '--save', tmp_path / 'r')
    assert r.returncode == 2 and 'missing normal_concat, reduce, reduce_concat' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_data(tmp_path):
    r = run_script('train.py', '--data', tmp_path / 'none', '--no_download', '--save', tmp_path / 'r')
    assert r.returncode == 2 and 'no CIFAR-10 in' in r.stderr


@pytest.mark.slow
def test_exported_model_classifies_image_files_like_the_test_program(reference, cifar_dir, tmp_path):
    from PIL import Image
    import reader
    run_dir, _ = reference
    _, _, test_x, test_y = reader.load_cifar10(cifar_dir, download=False)
    paths = []
    for i, img in enumerate(test_x):       # the test set, as PNG files (lossless)
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(img.transpose(1, 2, 0)).save(paths[-1])
    r = run_script('train.py', '--predict', os.path.join(run_dir, 'inference', 'model'), *paths)
    assert r.returncode == 0, r.stderr
    rows = [line.split('\t') for line in r.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == paths
    from darts import datasets
    predicted = np.array([datasets.CIFAR10_CLASSES.index(row[1]) for row in rows])
    assert all(0 < float(row[2]) <= 1 for row in rows)
    best = max(history(run_dir), key=lambda x: x['val_acc'])['val_acc']
    assert (predicted == test_y).mean() == pytest.approx(best, abs=1e-9)
    onnx = run_script('train.py', '--predict', os.path.join(run_dir, 'inference', 'model.onnx'), *paths)
    assert onnx.returncode == 0, onnx.stderr
    assert [row.split('\t')[:2] for row in onnx.stdout.strip().splitlines()] == [row[:2] for row in rows]


@pytest.mark.slow
def test_the_onnx_model_equals_paddle_inference_and_the_test_program(reference, cifar_dir):
    import reader
    import train
    run_dir, _ = reference
    assert 'its probabilities equal Paddle Inference' in open(os.path.join(run_dir, 'log.txt')).read()
    _, _, test_x, _ = reader.load_cifar10(cifar_dir, download=False)
    data = json.load(open(os.path.join(run_dir, 'data.json')))
    x = reader.normalize(test_x[:16], np.array(data['mean'], 'float32'), np.array(data['std'], 'float32'))
    by_onnx, by_inference, by_program = onnx_paddle_and_test_program(run_dir, train.TASK, x)
    assert by_onnx.shape == (16, 10) and by_program.max() > 0.5    # a trained model, not uniform outputs
    np.testing.assert_allclose(by_onnx, by_inference, atol=1e-4)
    np.testing.assert_allclose(by_onnx, by_program, atol=1e-4)


@pytest.mark.slow
def test_export_onnx_converts_a_run_and_a_failure_is_one_line(reference, tmp_path):
    import shutil
    run_dir, _ = reference
    copy = tmp_path / 'run'
    shutil.copytree(run_dir, copy)
    os.remove(copy / 'inference' / 'model.onnx')
    r = run_script('train.py', '--export_onnx', copy)
    assert r.returncode == 0 and 'equal Paddle Inference' in r.stdout, r.stdout + r.stderr
    assert os.path.getsize(copy / 'inference' / 'model.onnx') > 0
    os.remove(copy / 'inference' / 'model.onnx')
    (copy / 'inference' / 'model.json').write_text('{"not": "a program"}')
    assert_one_line_error(run_script('train.py', '--export_onnx', copy), 'ONNX conversion', 'the Paddle model is kept')
    assert not os.path.exists(copy / 'inference' / 'model.onnx')
    assert os.path.isfile(copy / 'inference' / 'model.pdiparams')


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_predict_without_a_model(tmp_path):
    r = run_script('train.py', '--predict', tmp_path / 'nope' / 'model', tmp_path / 'a.png')
    assert r.returncode == 2 and 'no exported model there' in r.stderr


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_a_search_run_is_refused_by_resume_and_eval_only(tmp_path):
    run_dir = tmp_path / 'search'
    run_dir.mkdir()
    import train_search
    (run_dir / 'args.json').write_text(json.dumps(vars(train_search.parse_args([]))))
    np.savez(run_dir / 'checkpoint.npz', __meta__=np.array(json.dumps({'epoch': 0, 'history': []})),
             weights=np.zeros(3, 'float32'))
    assert_one_line_error(run_script('train.py', '--resume', run_dir), 'is a search run', 'genotype.json')
    assert_one_line_error(run_script('train.py', '--eval_only', run_dir / 'checkpoint.npz'),
                          'not a checkpoint of a training run')


@pytest.mark.slow
@pytest.mark.parametrize('content', [None, '{"image_size": 32', '{"mean": [0.5]}'])
def test_predict_with_a_missing_or_malformed_preprocess_json(reference, tmp_path, content):
    import shutil
    run_dir, _ = reference
    model_dir = tmp_path / 'inference'
    shutil.copytree(os.path.join(run_dir, 'inference'), model_dir)
    if content is None:
        os.remove(model_dir / 'preprocess.json')
    else:
        (model_dir / 'preprocess.json').write_text(content)
    assert_one_line_error(run_script('train.py', '--predict', model_dir / 'model', tmp_path / 'a.png'),
                          'preprocess.json')
