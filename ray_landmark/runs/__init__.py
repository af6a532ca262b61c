"""Runs and their checkpoints: the floor below training, inference and serving.

folders.py     ``<output_dir>/<name>``: the one meaning of ``output_dir`` (runs, sweeps, ensembles); a run's logs
checkpoint.py  what a checkpoint holds, how a damaged one is detected, the newest good one, a model loaded from one
identity.py    what a rerun of a run folder may change, and ``--restart``
released.py    the released 2021 models converted into run folders of this project

Training writes runs; embedding, export, serving and the ensemble only read them, so none of them imports ``train/``.
"""
