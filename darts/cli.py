"""The command-line parsers of the scripts."""
import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is in --help)."""

    def error(self, message):
        print(f'{self.prog}: error: {message} (see --help)', file=sys.stderr)
        raise SystemExit(2)
