"""Numerical building blocks: fake quantization and distillation losses, each with a plain reference."""
