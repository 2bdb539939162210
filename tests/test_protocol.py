"""protocol.py on a tiny config: two searches, two retrains, a summary that matches the run
folders; killed after the first search and re-run, it finishes without repeating that search."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_script

FLAGS = ['--seeds', '2', '--dataset', 'digits', '--image_size', '16', '--init_channels', '4', '--layers', '2',
         '--nodes', '2', '--batch_size', '16', '--epochs', '1', '--num_workers', '0', '--train_portion', '0.1',
         '--first_order', '--retrain_epochs', '1', '--retrain_layers', '2', '--retrain_init_channels', '4',
         '--retrain_batch_size', '32', '--val_fraction', '0.2', '--retrain_flags', '--drop_path_prob 0']


def test_bad_flags_are_one_line_and_nothing_is_written(tmp_path):
    out = str(tmp_path / 'p')
    for bad, says in ((['--no_such_flag'], 'train_search.py flags'), (['--seed', '3'], 'set by the protocol'),
                      (['--retrain_flags', '--layers x'], 'train.py flags'), (['--seeds', 'two'], '--seeds')):
        r = run_script('protocol.py', *bad, '--save', out)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.exists(out)
    r = run_script('protocol.py', '--dataset', 'folder', '--data', str(tmp_path / 'missing'), '--save', out)
    assert r.returncode == 2 and 'search 1/4 (seed 0) failed' in r.stderr and not os.path.exists(out), r.stderr


def test_protocol_runs_every_seed_resumes_after_a_kill_and_summarises(tmp_path):
    out = str(tmp_path / 'protocol')
    flags = [*FLAGS, '--random', '3', '--random_seed', '7']
    cmd = [sys.executable, os.path.join(ROOT, 'protocol.py'), *flags, '--save', out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = os.path.join(out, 'search-0', 'result.json')
    try:
        deadline = time.time() + 600
        while not os.path.isfile(first) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.isfile(first), 'the first search never finished'
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    log_before = open(os.path.join(out, 'search-0', 'log.txt')).read()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'search 1/2 (seed 0): done already' in r.stdout
    assert open(os.path.join(out, 'search-0', 'log.txt')).read() == log_before     # not run again
    summary = json.load(open(os.path.join(out, 'summary.json')))
    assert [row['seed'] for row in summary['runs']] == [0, 1]
    for row in summary['runs']:
        s = row['seed']
        history = [json.loads(line) for line in open(os.path.join(out, f'search-{s}', 'history.jsonl'))]
        assert row['search_val_top1'] == history[-1]['val_acc']
        retrain = [json.loads(line) for line in open(os.path.join(out, f'retrain-{s}', 'history.jsonl'))]
        assert row['retrain_val_top1'] == max(h['val_acc'] for h in retrain)
        assert row['genotype'] == json.load(open(os.path.join(out, f'search-{s}', 'result.json')))['genotype']
        args = json.load(open(os.path.join(out, f'retrain-{s}', 'args.json')))
        assert (args['seed'], args['epochs'], args['val_fraction'], args['image_size']) == (s, 1, 0.2, 16)
        log = open(os.path.join(out, f'retrain-{s}', 'log.txt')).read()
        assert 'validation loss' in log and 'per-class accuracy on the validation split:' in log and 'test split:' not in log
    best = max(summary['runs'], key=lambda r: r['retrain_val_top1'])
    assert summary['best_seed'] == best['seed']
    table = open(os.path.join(out, 'summary.md')).read()
    assert table.count('| 0') + table.count('| 1') >= 2 and 'mean ± std' in table and '(best)' in table
    assert os.path.getsize(os.path.join(out, 'summary.png')) > 1000
    # the random cells: drawn from the search's space, seeded, retrained as the searched ones
    import numpy as np
    import genotypes
    rand = summary['random']
    assert [row['cell'] for row in rand['runs']] == [0, 1, 2]
    for row in rand['runs']:
        g = genotypes.load(row['genotype_file'])
        assert g == genotypes.random_genotype(np.random.default_rng([7, row['cell']]), genotypes.PRIMITIVES, 2)
        assert genotypes.from_dict(row['genotype']) == g
        args = json.load(open(os.path.join(row['retrain_dir'], 'args.json')))
        assert (args['seed'], args['epochs'], args['val_fraction'], args['image_size']) == \
            ([0, 1][row['cell'] % 2], 1, 0.2, 16)
    searched = [row['retrain_val_top1'] for row in summary['runs']]
    drawn = [row['retrain_val_top1'] for row in rand['runs']]
    assert rand['groups']['searched']['mean'] == np.mean(searched) and rand['groups']['random']['best'] == max(drawn)
    for row in summary['runs']:
        assert row['beats_random'] == sum((row['retrain_val_top1'] > d) + 0.5 * (row['retrain_val_top1'] == d)
                                          for d in drawn)
    assert 0 <= rand['mann_whitney_p'] <= 1 and 'Mann-Whitney' in table and 'Random cells' in table
    assert os.path.getsize(os.path.join(out, 'random.png')) > 1000
    # a finished protocol re-run only summarises
    r = run_script('protocol.py', *flags, '--save', out)
    assert r.returncode == 0 and r.stdout.count('done already') == 7, r.stdout


def test_a_budget_sweep_searches_each_budget_and_plots_accuracy_against_cost(tmp_path):
    import paddle
    import budget
    from model_search import SearchSpace
    paddle.enable_static()
    target = budget.Target('cifar', 4, 2, 16, in_channels=1, num_classes=10)   # the retrain network
    low = budget.cost_table(target, SearchSpace(nodes=2)).cheapest()['params']
    tight, loose = int(low * 1.1), 10 ** 6
    out = str(tmp_path / 'sweep')
    flags = [f if f != '2' or FLAGS[k - 1] != '--seeds' else '1' for k, f in enumerate(FLAGS)]
    r = run_script('protocol.py', *flags, '--budgets', f'params={tight},params={loose}', '--target_channels', '4',
                   '--target_layers', '2', '--save', out)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, 'summary.json')) as f:
        rows = json.load(f)['runs']
    assert [row['budget'] for row in rows] == [f'params={tight}', f'params={loose}']
    for row, limit in zip(rows, (tight, loose)):
        assert row['target_costs']['params'] <= limit
        assert row['parameters'] == row['target_costs']['params']   # the retrain is the target network
        assert os.path.isdir(row['search_dir']) and row['search_dir'].endswith(f'search-params{limit}-0')
    assert os.path.getsize(os.path.join(out, 'budget_sweep.png')) > 0
    assert f'| params={tight} | 0' in open(os.path.join(out, 'summary.md')).read()
    r = run_script('protocol.py', '--budgets', 'params=1M,flops=2', '--save', str(tmp_path / 'bad'))
    assert r.returncode == 2 and '--budgets' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_script('protocol.py', '--budgets', 'params=1M', '--budget', 'params=2M', '--save', str(tmp_path / 'bad'))
    assert r.returncode == 2 and 'set by the protocol' in r.stderr, r.stderr
