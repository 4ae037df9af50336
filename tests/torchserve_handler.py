"""TorchServe's stock image classifier for the shipped default model (32x32 input).

``ImageClassifier`` (``ts.torch_handler.image_classifier``) is used as it ships: its
``postprocess`` answers the top 5 as ``{name: probability}`` from ``index_to_name.json``. Only
``image_processing`` changes, from ImageNet's resize-crop-normalize to the default model's own
input (a 32x32 RGB image in [0, 1]; the model normalizes inside). A model archived under the
name ``jpeg-only`` refuses anything but JPEG with HTTP 415, as JPEG-only APIs do.
"""

from __future__ import annotations

from typing import Any

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier
from ts.utils.util import PredictionException

JPEG_MAGIC = b"\xff\xd8\xff"


class DefaultModelClassifier(ImageClassifier):  # type: ignore[misc]
    image_processing = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])

    def preprocess(self, data: list[dict[str, Any]]) -> Any:
        if self.context.manifest["model"]["modelName"] == "jpeg-only":
            for row in data:
                body = row.get("data") or row.get("body") or b""
                if not bytes(body[:3]) == JPEG_MAGIC:
                    raise PredictionException("expected a JPEG image", 415)
        return super().preprocess(data)
