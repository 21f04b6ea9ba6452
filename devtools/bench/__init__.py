"""The benchmarks: one load runner (runner.py), one way to say a target is met (targets.py), one settings
type (Workload, workload.py), archives built only through the archiver (archives.py), and one module per
suite (suites/). scripts/bench.py is their command line (cli.py)."""
