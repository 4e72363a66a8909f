"""In-memory datasets of the data plugin: images and labels held as two tensors."""

from __future__ import annotations

from torch.utils.data import TensorDataset


class LabelledTensors(TensorDataset):
    """``TensorDataset(images, labels)`` whose samples are ``(image, int label)``, as the folder
    datasets' are (not a 0-d label tensor)."""

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return image, int(label)
