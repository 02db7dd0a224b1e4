"""Tests of `msrl`, one file per module."""
