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
    real = cli.ArgumentParser.parse_args

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
            cli.ArgumentParser.parse_args = real
            del cli.ArgumentParser.parse_known_args
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


@pytest.mark.parametrize('script, flags', [
    ('train_search.py', ['--epoch', '0']), ('train.py', ['--epoch', '0']),
    ('train_imagenet.py', ['--epoch', '0']), ('visualize.py', ['DARTS_V2', '--form', 'svg'])])
def test_abbreviated_flags_are_refused_with_the_one_error_prefix(script, flags, tmp_path):
    r = run_script(script, *flags, '--save', tmp_path / 'r') if script != 'visualize.py' else run_script(script, *flags)
    assert_one_line_error(r, f'unrecognized arguments: {flags[-2]}', 'see ' + script + ' --help')
    assert not (tmp_path / 'r').exists()
