"""Reproducing the paper's tables: launcher, aggregation, and the diff against upstream OPD.

- `tables`        what each table shows and the numbers the paper publishes
- `launch`        run a table's cells (`scripts/reproduce_table*.sh` call it)
- `aggregate`     `python -m scripts.paper.aggregate --table N` renders a table
- `upstream_diff` `python -m scripts.paper.upstream_diff` compares one run with
                  a run of the upstream (verl-based) OPD repository (its console log or CSV exports)

Nothing here imports torch or loads a model: planning resolves configs with
`opd.config.load_config` only, and aggregation reads JSON files.
"""
