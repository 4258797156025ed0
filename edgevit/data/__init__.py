"""Data sources: ImageFolder directories, scikit-learn digits (offline), and .npz arrays."""

from edgevit.data.task_data import TaskData, build_data

__all__ = ["TaskData", "build_data"]
