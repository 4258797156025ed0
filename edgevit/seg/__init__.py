"""Semantic segmentation building blocks: metrics, losses and paired image/mask data.

Computed one way for every consumer (training validation, pruning, quantize budget, export
parity, benchmark, report) so that an mIoU means the same number everywhere.
"""
