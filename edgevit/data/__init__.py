"""Data sources: ImageFolder directories, scikit-learn digits (offline), and .npz arrays."""

from edgevit.data.bundle import DataBundle, build_data

__all__ = ["DataBundle", "build_data"]
