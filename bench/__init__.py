"""Side-by-side benchmarks (not run in CI). See bench/README.md."""
