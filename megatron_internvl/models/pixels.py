"""ViT input: tiles travel as ``uint8 [T, 3, S, S]`` and are normalised where the ViT runs.

The data workers, the pinned host buffers, the host-to-device copy and the tensor-parallel
broadcast all carry one byte per channel; :func:`normalize_pixels` turns the tiles into ImageNet-
normalised values on the rank's device with the float32 operations of torchvision's ``ToTensor``
+ ``Normalize`` (divide by 255, subtract the mean, divide by the std: the order InternVL's
pipeline uses, so the values are bit-exact to it on the CPU), then casts to the model's dtype.
A float tensor is taken as already normalised (synthetic data, Hugging Face style callers) and
only cast.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [T, 3, S, S]`` -> ImageNet-normalised ``dtype`` on the tiles' device; float
    tiles are cast only."""
    if tiles.dtype != torch.uint8:
        return tiles.to(dtype)
    x = tiles.to(torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = x.div_(255.0).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)
