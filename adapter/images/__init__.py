"""The OCI image store shared by the runtimes that run images (see CONTRACT.md)."""

from adapter.images.image import Descriptor, Image, Progress
from adapter.images.store import ImageStore

__all__ = ["Descriptor", "Image", "ImageStore", "Progress"]
