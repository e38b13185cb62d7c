"""Errors raised while reading or writing checkpoints; every message names the file (and key)."""


class CheckpointError(ValueError):
    """A checkpoint file, index, config field or tensor is malformed or unsupported."""


class CheckpointFileNotFound(FileNotFoundError):
    """A file the checkpoint needs (a shard, config.json, the weights) does not exist."""
