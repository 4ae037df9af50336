"""The shipped default model behind KServe's own Python model server (package ``kserve``).

Run with the interpreter of ``.venvs/kserve`` (scripts/setup-test-env.sh) and the repository on
``PYTHONPATH``::

    .venvs/kserve/bin/python tests/kserve_predictor.py --http_port 8080 --grpc_port 8081

It serves these models over KServe's V1 (``/v1/models/{m}:predict``) and V2
(``/v2/models/{m}/infer``) REST APIs, each answering as a plain KServe predictor would, with
metadata that says only what the protocol requires:

- ``default``: declares no inputs or outputs; takes ``[N, 3, 32, 32]`` UINT8 (V2) or nested
  lists (V1 ``instances``); answers V2 with the logits as ``output-0`` (FP32 ``[N, 10]``) and
  V1 with ``predictions`` (probabilities).
- ``nhwc``: the same model behind an NHWC input, declared as ``[-1, 32, 32, 3]``.
- ``other``: another network (the default architecture with other weights) under another
  name, for model-identity checks.
- ``torchserve-shaped``: the default model answering V1 with TorchServe's stock image
  classifier's shape, a ``{name: probability}`` object of the top 5 per image.
- ``json-only``: the default model, failing (HTTP 500) on binary tensors, as a server without
  the binary tensor extension does.
- ``broken``: every inference fails with a multi-line error (as a crashing predictor does).
"""

from __future__ import annotations

import argparse
from typing import Any

import kserve
import numpy as np
import torch
from kserve import InferRequest, InferResponse, Model, ModelServer
from kserve.protocol.infer_type import InferOutput

from reprogram.zoo.registry import load_model


class Predictor(Model):  # type: ignore[misc]
    def __init__(self, name: str, *, layout: str = "NCHW", seed: int | None = None,
                 answer: str = "probs", declare: bool = False) -> None:
        super().__init__(name)
        self.layout = layout
        self.answer = answer
        self.declare = declare
        source = load_model("default")
        self.class_names = source.meta.class_names
        self.module = source.module
        if seed is not None:  # other weights: same architecture, another model
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3))
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        if not self.declare:
            return []
        return [{"name": "input-0", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        if not self.declare:
            return []
        return [{"name": "output-0", "datatype": "FP32", "shape": [-1, 10]}]

    def _logits(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"expected images [N, 3, 32, 32], got {list(x.shape)}")
        with torch.no_grad():
            return self.module(x / 255.0)

    def predict(self, payload: Any, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> Any:
        if self.name == "broken":
            raise RuntimeError("predictor crashed\nTraceback (most recent call last):\n"
                               '  File "/srv/model/predictor.py", line 42, in predict\n'
                               "MemoryError: out of memory")
        if isinstance(payload, InferRequest):
            binary = "inference-header-content-length" in {k.lower() for k in headers or {}}
            if self.name == "json-only" and binary:
                raise ValueError("cannot read binary tensor data\nTraceback (most recent call "
                                 'last):\n  File "/srv/model/codec.py", line 7')
            logits = self._logits(payload.inputs[0].as_numpy())
            out = InferOutput(name="output-0", shape=list(logits.shape), datatype="FP32")
            out.set_data_from_numpy(logits.numpy().astype(np.float32), binary_data=False)
            return InferResponse(model_name=self.name, infer_outputs=[out],
                                 response_id=payload.id or "")
        probs = torch.softmax(self._logits(np.asarray(payload["instances"])), dim=1)
        if self.answer == "torchserve":
            top = probs.topk(5, dim=1)
            return {"predictions": [
                {self.class_names[int(i)]: float(v) for v, i in zip(vs, ix, strict=True)}
                for vs, ix in zip(top.values, top.indices, strict=True)]}
        return {"predictions": probs.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    args, _ = parser.parse_known_args()
    models = [Predictor("default"), Predictor("nhwc", layout="NHWC", declare=True),
              Predictor("other", seed=7), Predictor("torchserve-shaped", answer="torchserve"),
              Predictor("json-only"), Predictor("broken")]
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                enable_grpc=False).start(models)


if __name__ == "__main__":
    main()
