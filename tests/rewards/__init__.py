"""Tests of `rewards`, one file per module."""
