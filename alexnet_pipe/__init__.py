"""alexnet-pipe: AlexNet fed by NVIDIA DALI pipelines reading HDF5 shards.

The loader as a library, for any model (README, "Your own model"):

    from alexnet_pipe import open_shards
    shards = open_shards("data/")                      # a folder `alexnet-pipe prepare` wrote
    loader = shards.loader("train", batch_size=64, device="gpu")
    for epoch in range(90):
        for images, labels in loader:                  # on the device, normalised, NCHW
            ...

Names are imported when first used: `import alexnet_pipe` stays as light as the command line's
start needs.
"""
__version__ = "0.1.0"
__all__ = ["open_shards", "Shards", "Loader", "Batch", "__version__"]

_WHERE = {"open_shards": "prepared", "Shards": "prepared", "Loader": "pipeline",
          "Batch": "pipeline"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"alexnet_pipe.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'alexnet_pipe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
