"""`make bench`: speed and storage figures, each a ratio of two things measured in the same run.

``bench.common`` holds the registry, timing, ratios, the results file, the table and the bench's
own S3 endpoint; ``bench.peers`` the peer latent layouts; ``bench.bench`` the benchmarks and the
entry point (``python -m bench.bench``).
"""
