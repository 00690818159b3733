"""The ``kdpipe`` command line: parse options, call one library function, report errors.

Only this package imports click. Library errors (:class:`KdpipeError`) become
one-line click errors with a non-zero exit; option values click can check
itself (ranges, choices) are rejected by click with exit status 2.

- ``base``: the ``kdpipe`` group, shared options and parsers, error reporting;
- ``stages``: fetch-data, pack-shards, train-teacher, cache-teacher, train-student, distill-online;
- ``tools``: evaluate, tune-bias, report, storage, verify, caches, lineage, bench.
"""

from kdpipe.cli import stages, tools  # registers the commands, in this order
from kdpipe.cli.base import main

__all__ = ["main", "stages", "tools"]
