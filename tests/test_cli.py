"""The commands' flags: every default shown in --help, no abbreviations, one error prefix."""
import argparse

import pytest

from conftest import assert_one_line_error, run_script


def parsers():
    import protocol
    import train
    import train_imagenet
    import train_search
    import visualize
    from darts import cli
    captured, building = {}, []
    real, real_known = cli.ArgumentParser.parse_args, cli.ArgumentParser.parse_known_args

    def capture(self, *a, **k):   # the parser itself, as each script builds it
        captured[building[-1]] = self
        raise SystemExit(0)
    for module in (train_search, train, train_imagenet, protocol, visualize):
        building.append(module.__name__ + '.py')
        cli.ArgumentParser.parse_args = capture
        cli.ArgumentParser.parse_known_args = lambda self, *a, **k: capture(self)
        try:
            with pytest.raises(SystemExit):
                module.parse_args([])
        finally:
            cli.ArgumentParser.parse_args, cli.ArgumentParser.parse_known_args = real, real_known
    return captured


def test_every_flag_of_every_script_shows_its_default_in_help():
    found = parsers()
    assert len(found) == 5
    missing = []
    for prog, p in found.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                shown = bool(action.help)   # off unless given
            else:
                text = formatter._expand_help(action) if action.help else ''
                shown = 'default' in text.lower()
            if not shown:
                missing.append(f'{prog} {action.option_strings[0]}')
    assert not missing, missing


def in_process(script, argv, capsys):
    """(exit status, stderr lines) of script's main(argv), run in this process."""
    import importlib
    module = importlib.import_module(script[:-3])
    try:
        rc = module.main([str(a) for a in argv])
    except SystemExit as e:   # the parser's own exit
        rc = e.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize('script, flags', [
    ('train_search.py', ['--epoch', '0']), ('train.py', ['--epoch', '0']),
    ('train_imagenet.py', ['--epoch', '0']), ('visualize.py', ['DARTS_V2', '--form', 'svg'])])
def test_abbreviated_flags_are_refused_with_the_one_error_prefix(script, flags, tmp_path, capsys):
    save = ['--save', tmp_path / 'r'] if script != 'visualize.py' else []
    rc, err = in_process(script, [*flags, *save], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith('error: unrecognized arguments: ' + flags[-2]), err
    assert err[0].endswith(f'(see {script} --help)') or 'see' in err[0]
    assert not (tmp_path / 'r').exists()


def test_a_yaml_config_sets_the_flags_and_the_command_line_overrides_it(tmp_path):
    import train_search
    path = tmp_path / 'c.yaml'
    path.write_text('dataset: digits\nepochs: 7\nimage-size: 16\nfirst_order: true\nprimitives: none,skip_connect\n')
    args = train_search.parse_args(['--config', str(path), '--epochs', '3'])
    assert (args.dataset, args.epochs, args.image_size, args.first_order, args.primitives) == \
        ('digits', 3, 16, True, 'none,skip_connect')
    # every shipped config is read by its command
    import train
    import train_imagenet
    from conftest import ROOT
    for name, parse in (('demo', train_search), ('search-cifar10', train_search), ('train-cifar10', train),
                        ('train-imagenet', train_imagenet)):
        args = parse.parse_args(['--config', f'{ROOT}/configs/{name}.yaml'])
        assert args.config.endswith(f'{name}.yaml') and args.epochs > 1


def test_a_runs_args_json_works_as_a_config(tmp_path):
    import train_search
    first = train_search.parse_args(['--dataset', 'digits', '--image_size', '16', '--budget', 'params=50K',
                                     '--save', str(tmp_path / 'old'), '--nodes', '3', '--first_order'])
    path = tmp_path / 'args.json'
    import json
    path.write_text(json.dumps(vars(first)))
    again = train_search.parse_args(['--config', str(path), '--seed', '9'])
    changed = {k for k in vars(first) if vars(first)[k] != vars(again)[k]}
    assert changed == {'seed', 'save', 'config'} and again.save is None   # the old folder is not reused


@pytest.mark.parametrize('text, phrase', [
    ('epochs: [1, 2]\n', "epochs: [1, 2] is not a int"),
    ('device: tpu\n', "device: 'tpu' is not one of auto, gpu, cpu"),
    ('epoch: 3\n', "'epoch' is not a flag of"),
    ('primitives: [none, skip_connect]\n', "primitives: ['none', 'skip_connect'] is not a str"),
    ('- a\n- b\n', 'expected a mapping'),
    ('a: [\n', 'not YAML'),
    ('first_order: maybe\n', 'expected true or false')])
def test_a_bad_config_is_one_line(tmp_path, text, phrase, capsys):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    rc, err = in_process('train_search.py', ['--config', path, '--save', tmp_path / 'r'], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith('error: --config') and phrase in err[0], err
    assert not (tmp_path / 'r').exists()


def test_the_one_error_prefix_in_a_subprocess_too(tmp_path):
    r = run_script('train.py', '--epoch', '0', '--save', tmp_path / 'r')
    assert_one_line_error(r, 'unrecognized arguments: --epoch', 'see train.py --help')
