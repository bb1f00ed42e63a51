"""Data: image folders, caption files, the built-in demo set, and the batch pipeline."""
from mind_diffusion.data.pipeline import BatchStream, create_dataset, preview_items

__all__ = ["BatchStream", "create_dataset", "preview_items"]
