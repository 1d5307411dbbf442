"""Lets torchvision import beside a CPU-only torch, for the reference libraries the
conversion tests build (transformers, open_clip and timm all import torchvision).

The torchvision wheel on PyPI is a CUDA build: its compiled ops need libraries
that the CPU torch wheel lacks, so they never register, and torchvision's
import then fails where it attaches fake (meta) kernels to `torchvision::nms`
and `torchvision::qnms`. Declaring those two operator schemas first, without
any kernel, lets the pure-Python parts (models, transforms) import; the tests
never call a torchvision op. With a torchvision whose ops load, this does nothing.
Import it before anything that imports torchvision.
"""

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library = None  # kept alive: dropping the Library object would unregister the schemas


def _ops_loaded() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 (the lookup is the check)
        return True
    except (AttributeError, RuntimeError):
        return False


if not _ops_loaded():
    _library = torch.library.Library("torchvision", "DEF")
    for _op in ("nms", "qnms"):
        _library.define(_op + _SCHEMA)
