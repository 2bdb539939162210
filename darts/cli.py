"""The command-line parsers of the scripts: one-line errors, defaults in --help, no abbreviations,
settings from a --config file, and the flags every run has, declared once."""
import argparse
import json
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every flag's default after its help (unless the help
    already says what the default is; "off" for a flag whose feature is unused unless given)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if action.default is argparse.SUPPRESS or 'default' in text.lower() or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        shown = 'off' if action.default is None else '%(default)s'   # None: the feature or mode is not used
        return f'{text} (default: {shown})' if text else f'default: {shown}'


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is in --help), the defaults in --help,
    and no abbreviated flags (--epoch is not taken for --epochs)."""

    def __init__(self, *args, config=False, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)
        if config:
            self.add_argument('--config', metavar='FILE', default=None,
                              help='take the settings from a YAML or JSON file (keys: the flags\' names; a run\'s '
                                   'args.json works); flags on the command line override it (configs/ has examples)')

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        path = config_path(argv) if '--config' in self._option_string_actions else None
        if path is not None:
            self.set_defaults(**read_config(path, self))
        return super().parse_known_args(argv, namespace)

    def error(self, message):
        # the prefix every one-line error of the project has (darts.lifecycle.run_main's too)
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        raise SystemExit(2)


# A config file's keys that are not settings of a run: what the command does or where it writes
# (a run's args.json holds them too).
NOT_SETTINGS = ('config', 'save', 'resume', 'eval_only', 'predict', 'export_onnx', 'genotype')


def config_path(argv):
    """The FILE of --config FILE (or --config=FILE) in argv, or None."""
    for k, arg in enumerate(argv):
        if arg == '--config' and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
    return None


def read_config(path, parser):
    """{dest: value} from a YAML or JSON file of settings, checked against parser's flags: an unknown
    key, a value of the wrong type or outside a flag's choices is parser.error (one line)."""
    try:
        with open(path) as f:
            text = f.read()
        if path.endswith('.json'):
            settings = json.loads(text)
        else:
            import yaml   # optional: only a YAML config needs it (requirements.txt has it)
            settings = yaml.safe_load(text)
    except OSError as e:
        parser.error(f'--config {path}: {e.strerror or e}')
    except ValueError as e:   # json.JSONDecodeError, yaml.YAMLError are ValueError / ... below
        parser.error(f'--config {path}: not JSON ({e})')
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError and its kin: one line
        parser.error(f'--config {path}: not YAML ({" ".join(str(e).split())})')
    if not isinstance(settings, dict):
        parser.error(f'--config {path}: expected a mapping of flag names to values')
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    out = {}
    for key, value in settings.items():
        dest = str(key).lstrip('-').replace('-', '_')
        if dest in NOT_SETTINGS:
            continue
        if dest not in actions:
            parser.error(f'--config {path}: {key!r} is not a flag of {parser.prog}')
        out[dest] = _config_value(path, key, value, actions[dest], parser)
    return out


def _config_value(path, key, value, action, parser):
    """value as the flag takes it: converted by its type, checked against its choices."""
    takes_list = isinstance(action, argparse._AppendAction) or action.nargs in ('+', '*')
    if isinstance(value, list) and takes_list:
        return [_config_value(path, key, v, argparse.Action(action.option_strings, action.dest, type=action.type,
                                                             choices=action.choices), parser) for v in value]
    if isinstance(value, (list, dict)):
        parser.error(f'--config {path}: {key}: {value!r} is not a {getattr(action.type, "__name__", "str")}')
    if value is not None and action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            parser.error(f'--config {path}: {key}: {value!r} is not a {action.type.__name__}')
    if takes_list and not isinstance(value, list) and value is not None:
        value = [value]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and not isinstance(value, bool):
        parser.error(f'--config {path}: {key}: expected true or false, got {value!r}')
    if action.choices is not None and value is not None and value not in action.choices:
        parser.error(f'--config {path}: {key}: {value!r} is not one of {", ".join(map(str, action.choices))}')
    return value


def add_training_arguments(p, epochs, batch_size, learning_rate, weight_decay, init_channels, layers,
                           learning_rate_min=None):
    """The network's size and the weights' optimizer (SGD with momentum, global-norm clip)."""
    a = p.add_argument
    a('--epochs', type=int, default=epochs, help='epochs to run')
    a('--batch_size', type=int, default=batch_size, help='the global batch, whatever the number of processes')
    a('--init_channels', type=int, default=init_channels, help='C, the channels of the first cells')
    a('--layers', type=int, default=layers, help='cells in the network')
    a('--learning_rate', type=float, default=learning_rate, help="the weights' initial learning rate")
    if learning_rate_min is not None:
        a('--learning_rate_min', type=float, default=learning_rate_min,
          help='where the cosine schedule ends at the last epoch')
    a('--momentum', type=float, default=0.9, help='SGD momentum')
    a('--weight_decay', type=float, default=weight_decay, help='L2 weight decay of the weights')
    a('--grad_clip', type=float, default=5.0, help="the weights' gradient is clipped to this global norm")


def add_run_arguments(p, prefix, seed, num_workers=2, report_freq=50):
    """The flags of a run's life: device, kernels, seed, data workers, progress, the run folder."""
    a = p.add_argument
    a('--device', default='auto', choices=['auto', 'gpu', 'cpu'], help='auto: the GPU when there is one')
    a('--no_custom_kernels', action='store_true',
      help="Paddle's own depthwise and 1x1 convolutions instead of the compiled ones (CPU; see darts/kernels/)")
    a('--seed', type=int, default=seed, help='seeds the weights, the data order and the augmentation')
    a('--num_workers', type=int, default=min(num_workers, os.cpu_count() or 1),
      help='processes that decode images and make batches (0: none)')
    a('--report_freq', type=int, default=report_freq, help='a progress line every N steps (and at least every 30 s)')
    a('--no_tensorboard', action='store_true', help='write no TensorBoard event files (RUN_DIR/tensorboard)')
    a('--no_pictures', action='store_true', help='draw no pictures into the run folder when it ends (visualize.py '
                                                 '--run RUN_DIR draws them later)')
    a('--save', default=None, help=f'the run folder, which must not hold anything yet (default: '
                                   f'runs/{prefix}-DATE-TIME)')
    a('--resume', default=None, metavar='RUN_DIR',
      help='continue the run in RUN_DIR from its last checkpoint (from the start if it has none yet)')


def check_at_least(p, args, names, low=1):
    """--name must be at least low, for each of names whose value is set (not None)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f'--{name} must be at least {low}')


def changed_flags(args, names, defaults):
    """The command-line form of the flags in names whose value differs from defaults (a Namespace)."""
    out = []
    for name in names:
        value = getattr(args, name)
        if value == getattr(defaults, name):
            continue
        out += [f'--{name}'] if value is True else [f'--{name}', str(value)]
    return out
