"""CPU tensors that read as CUDA tensors of a chosen device: what the device guard and the graph lock look at
(``is_cuda``, ``get_device``), for their CPU tests."""

import torch


class CudaTensor(torch.Tensor):
    """A CPU tensor that reads as a CUDA tensor of device ``dev``."""

    dev = 0

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return self.dev


def on(dev: int, *shape: int) -> torch.Tensor:
    """A :class:`CudaTensor` of ``shape`` (default one element) reading as device ``dev``."""
    t = torch.Tensor._make_subclass(CudaTensor, torch.empty(*(shape or (1,))))
    t.dev = dev
    return t
