"""The `mergesearch` command for people, by mode.

- `main`: the parser and the entry points (`mergesearch`, `python -m mergesearch`);
- `local`: `mergesearch run` and `mergesearch report` (local mode, `mergesearch.local`);
- `cluster`: `mergesearch status`, `report --name` and the `kubectl mergesearch` plugin (reads a
  MergeSearch on a cluster with kubectl);
- `datasets`: `mergesearch datasets pack` (the data bundle registry tasks read).

See docs/modules.md.
"""
