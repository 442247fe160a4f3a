"""Method-independent machinery: walking the module tree, matching targets, adapter layers, injection."""
