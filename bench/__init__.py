"""`make bench` and `make drills`: speed and storage figures (each a ratio of two things measured in
the same run), and faults the pipeline must survive.

``bench.harness`` holds what both share: the registry of named items, the results file merged by
item name, and plain-text tables. ``bench.common`` holds the bench's registry, timing, ratios,
results file, table and its own S3 endpoint; ``bench.peers`` the peer latent layouts;
``bench.bench`` the benchmarks and the entry point (``python -m bench.bench``). ``bench.drills``
is the drills' package (``python -m bench.drills``), ``bench.faultproxy`` their fault proxy.
"""
