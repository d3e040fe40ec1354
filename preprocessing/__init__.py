"""Offline preprocessing: an ImageNet tree -> 256x256 HDF5 shards + augmentation statistics."""
