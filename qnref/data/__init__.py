"""Data sets and batching: digits, MNIST-1D, the papers' synthetic problems, IDX / CIFAR files.

>>> from qnref.data import load_dataset
>>> ds = load_dataset("digits", seed=0)            # Dataset: X_train (1437, 1, 8, 8), y_train int64
>>> ds = ds.to("cpu", "float32")                   # or "gpu" (CuPy)

See docs/data.md for every data set, its source and the papers it serves.
"""
from .batches import BatchIterator, SubsetSampler, check_batch_size, epoch_batches, sample_indices
from .cifar import load_cifar10_arrays, read_batch as read_cifar_batch
from .dataset import (
    LOSS_NAMES,
    TASKS,
    Dataset,
    Scaler,
    as_generator,
    fit_minmax,
    fit_standardizer,
    stratified_indices,
    train_test_split,
)
from .idx import find_mnist_files, load_mnist_arrays, parse_idx, read_idx, write_idx
from .registry import (
    ALIASES,
    DATASETS,
    cache_dir,
    canonical_name,
    load_dataset,
    make_imbalanced,
    mnist1d_arrays,
    register_dataset,
)

__all__ = [
    "ALIASES",
    "BatchIterator",
    "DATASETS",
    "Dataset",
    "LOSS_NAMES",
    "Scaler",
    "SubsetSampler",
    "TASKS",
    "as_generator",
    "cache_dir",
    "canonical_name",
    "check_batch_size",
    "epoch_batches",
    "find_mnist_files",
    "fit_minmax",
    "fit_standardizer",
    "load_cifar10_arrays",
    "load_dataset",
    "load_mnist_arrays",
    "make_imbalanced",
    "mnist1d_arrays",
    "parse_idx",
    "read_cifar_batch",
    "read_idx",
    "register_dataset",
    "sample_indices",
    "stratified_indices",
    "train_test_split",
    "write_idx",
]
