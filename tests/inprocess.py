"""The in-process grid the tests use: :class:`fedsqueeze.inprocess.InProcessGrid`."""

from fedsqueeze.inprocess import InProcessGrid

__all__ = ["InProcessGrid"]
