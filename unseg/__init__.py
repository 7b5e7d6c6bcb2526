"""unseg: unsupervised semantic segmentation (MaskDistill, with CrOC and HSG pretraining) as a DVC pipeline."""

__version__ = "0.1.0"
