"""Scripts that measure: the comparison sweeps, the memory and op benchmarks, the ops'
robustness runner and its cases, the reliability trials. Training never imports them
(the CLI's `bench memory` runs bench_memory)."""
