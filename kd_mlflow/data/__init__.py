"""Datasets as uint8 tensors, splits, and a device-resident batch iterator.

``datasets`` (what each dataset is), ``sources`` (reading the files), ``splits`` (a run's
splits), ``batches`` (device-resident and streamed batches), ``imagefolder`` (your own
images), ``augment`` (RandAugment on uint8 tensors).

Fashion-MNIST and CIFAR fit in memory many times over, so the whole split lives on
the training device as uint8 and each batch is cropped, flipped and normalised there
in a few vectorised ops. This removes the per-sample PIL pipeline and the DataLoader
workers that dominate small-model training on a 2-core CPU.
"""

from .batches import DeviceBatches, StreamBatches
from .datasets import DATASETS, DatasetInfo
from .sources import CIFAR_LAYOUTS, class_names, cifar_class_names, data_source, load_arrays
from .splits import DataBundle, Split, dataset_info, load_data

__all__ = ["CIFAR_LAYOUTS", "DATASETS", "DataBundle", "DatasetInfo", "DeviceBatches", "Split", "StreamBatches",
           "cifar_class_names", "class_names", "data_source", "dataset_info", "load_arrays", "load_data"]
