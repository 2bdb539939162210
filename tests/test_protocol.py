"""protocol.py on a tiny config: two searches, two retrains, a summary that matches the run
folders; killed after the first search and re-run, it finishes without repeating that search."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

FLAGS = ['--seeds', '0,1', '--dataset', 'digits', '--image_size', '16', '--init_channels', '4', '--layers', '2',
         '--nodes', '2', '--batch_size', '16', '--epochs', '1', '--num_workers', '0', '--train_portion', '0.1',
         '--first_order', '--retrain_epochs', '1', '--retrain_layers', '2', '--retrain_init_channels', '4',
         '--retrain_batch_size', '32', '--val_fraction', '0.2', '--retrain_flags', '--drop_path_prob 0']


def kill_when(cmd, path, never, timeout=900):
    """Start cmd (a protocol) in its own process group, and SIGKILL the group once path exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not os.path.isfile(path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.isfile(path), never
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_bad_flags_are_one_line_and_nothing_is_written(tmp_path):
    out = str(tmp_path / 'p')
    for bad, says in ((['--no_such_flag'], 'train_search.py flags'), (['--seed', '3'], 'set by the protocol'),
                      (['--retrain_flags', '--layers x'], 'train.py flags'), (['--seeds', 'two'], '--seeds')):
        r = run_script('protocol.py', *bad, '--save', out)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not os.path.exists(out)
    r = run_script('protocol.py', '--dataset', 'folder', '--data', str(tmp_path / 'missing'), '--save', out)
    assert r.returncode == 2 and 'search 1/4 (seed 0) failed' in r.stderr and not os.path.exists(out), r.stderr


@pytest.mark.slow
def test_protocol_runs_every_seed_resumes_after_a_kill_and_summarises(tmp_path):
    out = str(tmp_path / 'protocol')
    flags = [*FLAGS, '--random', '3', '--random_seed', '7']
    cmd = [sys.executable, os.path.join(ROOT, 'protocol.py'), *flags, '--save', out]
    kill_when(cmd, os.path.join(out, 'search-0', 'result.json'), 'the first search never finished', timeout=600)
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
        assert 'validation loss' in log and 'per-class accuracy on the validation split:' in log \
            and 'test split:' not in log
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
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 1000
    # a finished protocol re-run only summarises
    r = run_script('protocol.py', *flags, '--save', out)
    assert r.returncode == 0 and r.stdout.count('done already') == 7, r.stdout


@pytest.mark.slow
def test_a_budget_sweep_searches_each_budget_and_plots_accuracy_against_cost(tmp_path):
    import paddle
    from darts.search import budget
    from model_search import SearchSpace
    paddle.enable_static()
    target = budget.Target('cifar', 4, 2, 16, in_channels=1, num_classes=10)   # the retrain network
    low = budget.cost_table(target, SearchSpace(nodes=2)).cheapest()['params']
    tight, loose = int(low * 1.1), 10 ** 6
    out = str(tmp_path / 'sweep')
    flags = [f if f != '0,1' or FLAGS[k - 1] != '--seeds' else '0' for k, f in enumerate(FLAGS)]
    r = run_script('protocol.py', *flags, '--budget', f'params={tight}', '--budget', f'params={loose}',
                   '--target_channels', '4', '--target_layers', '2', '--save', out)
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
    r = run_script('protocol.py', '--budget', 'params=1M,flops=2', '--save', str(tmp_path / 'bad'))
    assert r.returncode == 2 and '--budget' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_script('protocol.py', '--budget', 'params=1M', '--variants', 'a=--budget params=2M', '--save',
                   str(tmp_path / 'bad'))
    assert r.returncode == 2 and 'set by the protocol' in r.stderr, r.stderr


def test_matched_draws_land_in_the_window_are_seeded_and_counted_like_the_real_network():
    import numpy as np
    import paddle
    from darts.search import budget
    import genotypes
    from model_search import SearchSpace
    paddle.enable_static()
    target = budget.Target('cifar', 4, 2, 16, in_channels=1, num_classes=10)
    table = budget.cost_table(target, SearchSpace(nodes=2))
    sample = [table.genotype_cost(genotypes.random_genotype(np.random.default_rng([5, t]), genotypes.PRIMITIVES, 2))
              ['params'] for t in range(500)]
    low, high = min(sample), max(sample)
    assert table.cheapest()['params'] <= low < high
    middle = (low + high) // 2
    window = (int(middle * 0.9), int(middle * 1.1))
    drawn = []
    for i in range(4):
        g, cost, draws = budget.draw_within(table, 'params', window, np.random.default_rng([3, i]),
                                            genotypes.PRIMITIVES, 2, exclude=drawn)
        assert window[0] <= cost <= window[1] and draws >= 1
        assert cost == budget.network_cost(target, g)['params']   # the built network's own count
        drawn.append(g)
    assert len({genotypes.to_json(g) for g in drawn}) == 4
    again = budget.draw_within(table, 'params', window, np.random.default_rng([3, 0]), genotypes.PRIMITIVES, 2)
    assert again[0] == drawn[0]
    other = budget.draw_within(table, 'params', window, np.random.default_rng([4, 0]), genotypes.PRIMITIVES, 2)
    assert other[0] != drawn[0]
    assert budget.draw_within(table, 'params', (high + 1, high + 100), np.random.default_rng(0),
                              genotypes.PRIMITIVES, 2, max_draws=300) is None


VARIANT_FLAGS = [*[f if f != '0,1' or FLAGS[k - 1] != '--seeds' else '0' for k, f in enumerate(FLAGS)],
                 '--variants', 'first=;second=--second_order --arch_learning_rate 1e-2']


@pytest.mark.slow
def test_variants_random_cells_at_equal_size_baselines_and_retrain_seeds_resume_and_summarise(tmp_path):
    import numpy as np
    import genotypes
    mine = str(tmp_path / 'mine.json')
    genotypes.save(genotypes.DARTS_V1, mine)
    out = str(tmp_path / 'pays')
    flags = [*VARIANT_FLAGS, '--random', '2', '--random_match', 'params', '--random_seed', '3',
             '--baselines', f'DARTS_V2,{mine}', '--retrain_seeds', '2', '--jobs', '2']
    cmd = [sys.executable, os.path.join(ROOT, 'protocol.py'), *flags, '--save', out]
    # the protocol and the two runs it has going
    kill_when(cmd, os.path.join(out, 'retrain-first-0-r1', 'args.json'), 'the second round never started')
    deadline = time.time() + 30
    while [p for p in os.listdir('/proc') if p.isdigit() and _cmdline_has(p, out)] and time.time() < deadline:
        time.sleep(0.2)
    kept = {d: open(os.path.join(out, d, 'log.txt')).read() for d in os.listdir(out)
            if os.path.isfile(os.path.join(out, d, 'result.json'))}
    assert 'retrain-first-0-r1' not in kept and len(kept) >= 2 + 5
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'resuming' in r.stdout and r.stdout.count('done already') == len(kept)
    assert all(open(os.path.join(out, d, 'log.txt')).read() == log for d, log in kept.items())   # not run again
    summary = json.load(open(os.path.join(out, 'summary.json')))
    # two variants, one row each, their own flags
    rows = summary['runs']
    assert [(row['variant'], row['seed']) for row in rows] == [('first', 0), ('second', 0)]
    a = json.load(open(os.path.join(out, 'search-first-0', 'args.json')))
    b = json.load(open(os.path.join(out, 'search-second-0', 'args.json')))
    assert (a['first_order'], a['arch_learning_rate'], b['first_order'], b['arch_learning_rate']) == \
        (True, 3e-4, False, 1e-2)
    # every cell retrained twice, seeds S and S+1; its mean and sd from its two retrains
    cells = rows + summary['random']['runs'] + summary['baselines']
    assert len(cells) == 6
    for row in cells:
        values = []
        for d, seed in zip(row['retrain_dirs'], row['retrain_seeds']):
            args = json.load(open(os.path.join(d, 'args.json')))
            assert (args['seed'], args['genotype_file']) == (seed, row['genotype_file'])
            values.append(json.load(open(os.path.join(d, 'result.json')))['top1'])
        assert row['retrain_seeds'][1] == row['retrain_seeds'][0] + 1 and row['retrain_val_top1_seeds'] == values
        assert abs(row['retrain_val_top1'] - np.mean(values)) < 1e-12
        assert abs(row['retrain_val_top1_sd'] - np.std(values, ddof=1)) < 1e-12
    # the random cells: one set for both variants, inside +-10 % of the searched cells' median (train.py's count)
    median = np.median([row['parameters'] for row in rows])
    for row in summary['random']['runs']:
        assert 0.9 * median - 1 <= row['parameters'] <= 1.1 * median + 1, (row['parameters'], median)
        saved = json.load(open(row['genotype_file']))['search_space']
        assert saved['match']['params'] == row['parameters'] and saved['random'] == [3, row['cell']]
    # baselines by name and by file, retrained as they are
    names = [row['name'] for row in summary['baselines']]
    assert names == ['DARTS_V2', 'mine']
    for row, g in zip(summary['baselines'], (genotypes.DARTS_V2, genotypes.DARTS_V1)):
        assert genotypes.from_dict(row['genotype']) == g
    # the groups and the noise floor, against an independent computation
    groups = {g['group']: g for g in summary['groups']}
    assert set(groups) == {'first', 'second', 'random', 'baseline DARTS_V2', 'baseline mine'}
    assert groups['random']['cells'] == 2 and abs(groups['random']['mean'] - np.mean(
        [row['retrain_val_top1'] for row in summary['random']['runs']])) < 1e-12
    within = np.sqrt(np.mean([np.var(row['retrain_val_top1_seeds'], ddof=1) for row in cells]))
    noise = summary['noise']
    assert abs(noise['within_sd'] - within) < 1e-12 and noise['retrain_seeds'] == 2
    random_means = [row['retrain_val_top1'] for row in summary['random']['runs']]
    assert abs(noise['cell_mean_sd'] - np.std(random_means, ddof=1)) < 1e-12   # the only group with 2 cells
    assert abs(groups['first']['vs_random']['detectable'] - 2.486 * noise['cell_mean_sd'] * np.sqrt(1 + 1 / 2)) < 1e-3
    table = open(os.path.join(out, 'summary.md')).read()
    assert 'noise floor: the same cell over 2 seeds varies by' in table and 'smallest difference 1 against 2' in table
    assert '| first | 0' in table and '| second | 0' in table and '| DARTS_V2 |' in table \
        and '(mean ± sd, 2 seeds)' in table
    assert os.path.getsize(os.path.join(out, 'comparison.png')) > 1000


def _cmdline_has(pid, text):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return text.encode() in f.read()
    except OSError:
        return False


def _fake_search(run_dir, genotype):
    """What a finished search leaves that the protocol reads, without searching."""
    import genotypes
    os.makedirs(run_dir)
    genotypes.save(genotype, os.path.join(run_dir, 'genotype.json'))
    with open(os.path.join(run_dir, 'data.json'), 'w') as f:
        json.dump(dict(image_size=16, channels=1, classes=[str(c) for c in range(10)]), f)
    with open(os.path.join(run_dir, 'result.json'), 'w') as f:
        json.dump(dict(genotype=genotypes.to_dict(genotype)), f)


@pytest.mark.slow
def test_bad_variants_baselines_and_an_unreachable_match_are_one_line(tmp_path, monkeypatch, capsys):
    for bad, says in ((['--variants', 'a=--no_such_flag'], 'train_search.py (variant a) flags'),
                      (['--variants', 'a=;a=--first_order'], 'given twice'),
                      (['--variants', 'random=--first_order'], 'NAME=FLAGS'),
                      (['--variants', 'a=--seed 3'], 'set by the protocol'),
                      (['--baselines', 'DARTS_V9'], 'neither a named genotype'),
                      (['--baselines', str(tmp_path / 'missing.json')], 'cannot read genotype file'),
                      (['--random_match', 'params'], '--random N'),
                      (['--random', '2', '--random_match', 'flops'], 'invalid choice'),
                      (['--retrain_seeds', '0'], '--retrain_seeds must be at least 1')):
        r = run_script('protocol.py', *bad, '--save', str(tmp_path / 'p'))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0] and lines[0].startswith('error: '), \
            r.stderr
        assert not os.path.exists(tmp_path / 'p')
    # a space of 9 cells (skips only, 2 nodes): a tenth cell unlike the others cannot be drawn
    import genotypes
    import protocol
    skips = genotypes.Genotype([('skip_connect', 0), ('skip_connect', 1)] * 2, [2, 3],
                               [('skip_connect', 0), ('skip_connect', 1)] * 2, [2, 3])
    monkeypatch.setattr(protocol, 'run_step', lambda what, script, flags, run_dir: _fake_search(run_dir, skips))
    rc = protocol.main(['--seeds', '0', '--primitives', 'none,skip_connect', '--nodes', '2',
                        '--dataset', 'digits', '--image_size', '16', '--retrain_layers', '2',
                        '--retrain_init_channels', '4', '--random', '10', '--random_match', 'params',
                        '--save', str(tmp_path / 'unreachable')])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith('error: --random_match params: 20,000 cells drawn'), err
    drawn = [genotypes.load(str(tmp_path / 'unreachable' / f'random-{i}' / 'genotype.json')) for i in range(10)
             if os.path.isfile(tmp_path / 'unreachable' / f'random-{i}' / 'genotype.json')]
    assert 0 < len(drawn) <= 9 and len({genotypes.to_json(g) for g in drawn}) == len(drawn)


def test_seeds_name_the_seeds_themselves():
    import protocol

    class Refused(Exception):
        pass

    class Parser:
        def error(self, message):
            raise Refused(message)
    p = Parser()
    assert protocol.seed_list('2', p) == [2]                   # seed 2, not two seeds
    assert protocol.seed_list('0-3', p) == [0, 1, 2, 3]
    assert protocol.seed_list('0-1, 7', p) == [0, 1, 7]
    for bad in ('two', '3-1', '1,1', '0-2,2', ''):
        with pytest.raises(Refused, match='--seeds'):
            protocol.seed_list(bad, p)
