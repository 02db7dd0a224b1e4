"""Tests of `datamodules`, one file per module."""
