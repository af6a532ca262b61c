"""Landmark embedding models and their loss (solution.md §2, §3).

config.py      the ``model`` and ``loss`` config sections
factory.py     build_model / embed: the interface the training loop, the embedding job and export use
layers.py      GeM, necks, multi-atrous, spatial attention, orthogonal fusion
efficientnet.py, dolg.py, hybrid_swin.py   the three model families
arcface.py     sub-center ArcFace head, dynamic margins, ArcFace loss
transfer.py    freeze_except / warm_start between recipe steps

Nothing is imported here, so that loading a config does not import torch.
"""
