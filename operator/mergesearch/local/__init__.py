"""Local mode: the whole search on one machine, no cluster (`mergesearch run`).

- `search`: the resumable search loop on a resident model (`LocalSearch`);
- `records`: the append-only trial log beside the engine state;
- `summary`: tables and the paper's claims checked on a finished search;
- `report`: the PNG pictures (also drawn for a search read from a cluster).

See docs/modules.md.
"""
