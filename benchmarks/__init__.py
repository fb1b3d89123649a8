"""Benchmarks: the serving load generator (pdserve bench) and comparison scripts."""
