"""The errors a user can cause, in one place (no module needs another's to report one).

Each is reported by lifecycle.run_main as one line on stderr with exit status 2.
"""


class UserError(Exception):
    """A problem with what the user asked for: flags, files, the run folder."""


class DataError(UserError):
    """Bad or missing data (reader.py, datasets.py)."""


class GenotypeError(UserError, ValueError):
    """A genotype that is unknown, malformed or outside the search space (genotypes.py)."""


class SearchSpaceError(UserError, ValueError):
    """An op list or cell setting the search network cannot be built with (model_search.py)."""
