"""Side-by-side cost measurements of the callback; ``python benchmarks/run.py`` writes RESULTS.md."""
