"""MoLink's benchmarks and the tools they share (swarm launcher, load client, link emulator).

Run the scripts as modules from the repository root, e.g. ``python -m benchmark.compare``;
``tests/`` imports the shared parts (``benchmark.processes``, ``benchmark.loadgen``).
"""
