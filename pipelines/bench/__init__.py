"""Benchmarks that print figures: bookkeeping overhead, evolution throughput, batching, ablations."""
