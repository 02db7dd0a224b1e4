"""Tests of `lightning_modules`, one file per module."""
