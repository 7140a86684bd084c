"""Benchmark suite for embedserve and the synthetic OCT data set it runs on."""
