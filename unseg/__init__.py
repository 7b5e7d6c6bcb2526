"""unseg: unsupervised semantic segmentation (MaskDistill, with CrOC and HSG pretraining) as a DVC pipeline."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """A trained ``model.pt`` bundle -> (the network in eval mode, its preprocessing): see ``unseg.models.bundle``.
    Imported on call, so that ``import unseg.<module>`` stays free of torch where a stage does not need it."""
    from unseg.models.loading import load_model as load

    return load(path, device)


__all__ = ["load_model"]
