"""Benchmarks for the kernels (scripts, not tests). Run all: python -m dit_trainer.benchmarks [--quick].

Each prints ratios measured side by side in one run. Without CUDA (or with --quick) they
run small shapes through the PyTorch paths so they keep working; GPU figures need a GPU.
"""
