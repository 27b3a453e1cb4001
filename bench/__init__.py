"""kura-py benchmark harness: kura-py against nginx (HTTP) and BuildGrid (REAPI) in one run.

Entry point: ``python -m bench.run`` (see bench/README.md). Nothing here is imported by the node.
"""
