"""PEFT methods: one module per method, each registered by its ``peft_type``."""
