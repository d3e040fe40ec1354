"""alexnet-pipe: AlexNet fed by NVIDIA DALI pipelines reading HDF5 shards."""
__version__ = "0.1.0"
