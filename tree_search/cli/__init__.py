"""``tree-search``: the command line, thin over the library.

Errors in the user's input (files, flags, trees) print one line naming the problem
and exit with status 1; set ``TREE_SEARCH_DEBUG=1`` to see the traceback as well.
The group and what every command shares are in `tree_search.cli.app`; the commands,
by what they act on, in ``tree_commands``, ``head_commands``, ``data_commands`` and
``search_commands`` (importing them registers them).
"""

from tree_search.cli.app import main  # noqa: I001 - first: it says what to install when click is missing
from tree_search.cli import data_commands, head_commands, search_commands, tree_commands  # noqa: F401

__all__ = ["main"]
