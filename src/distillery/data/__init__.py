"""Datasets: the registry of named datasets, on-disk readers, downloads, preprocessing, and `load_dataset`
(in `dataset.py`), which assembles them into ready-to-use model-space tensors."""

from .dataset import Dataset, Split, data_root, dataset_status, load_dataset
from .formats import to_float01
from .registry import get_spec, list_datasets

__all__ = ["Dataset", "Split", "data_root", "dataset_status", "get_spec", "list_datasets", "load_dataset",
           "to_float01"]
