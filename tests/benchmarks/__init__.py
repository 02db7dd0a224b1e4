"""Tests of `benchmarks`, one file per module."""
