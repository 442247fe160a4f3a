"""Folding adapters into base weights, and combining several adapters into one."""
