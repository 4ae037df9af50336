"""Train ``shapes-clip`` contrastively on (image, caption) pairs of the shapes world.

CLIP's symmetric cross-entropy over a batch's image-text cosine matrix (Radford et al. 2021,
Fig. 3), with one change for a small vocabulary of captions: a batch's identical captions are
all positives of each other's images (soft targets), not false negatives. Model selection on
the zero-shot accuracy of validation images (shape names, the template
:data:`HAND_TEMPLATE`); the held-out accuracy is measured once, on images from a seed never
used in training or selection. ``python -m reprogram.zoo.train --model shapes-clip`` runs it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reprogram.zoo.captions import generate_pairs, labelled
from reprogram.zoo.clip import ShapesCLIP, tokenize
from reprogram.zoo.net import Normalize
from reprogram.zoo.shapes import SHAPE_CLASSES

log = logging.getLogger(__name__)

HAND_TEMPLATE = "a photo of a {}."
SIZE = 32
RECIPE = {"width": 24, "text_width": 64, "embed": 64, "train_seed": 31, "seed": 3,
          "epochs": 12, "lr": 2e-3, "weight_decay": 0.05, "batch": 256}
N_TRAIN, N_VAL, N_HELDOUT = 60_000, 1_000, 2_000
VAL_SEED, HELDOUT_SEED = 32, 20261207


@torch.inference_mode()
def zero_shot_accuracy(model: ShapesCLIP, normalize: Normalize, x: torch.Tensor,
                       y: torch.Tensor, names: tuple[str, ...],
                       template: str = HAND_TEMPLATE) -> float:
    """Top-1 accuracy of the prompts ``template.format(name)`` on uint8 images ``x``."""
    model.eval()
    text = model.encode_names(names, template)
    correct = 0
    for i in range(0, len(x), 500):
        image = model.encode_image(normalize(x[i : i + 500].float() / 255.0))
        correct += int((model.logits(image, text).argmax(1) == y[i : i + 500]).sum())
    return correct / max(len(x), 1)


def _loss(model: ShapesCLIP, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = model.logits(model.encode_image(images), model.encode_text(ids))
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()  # identical captions
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def train_clip(out_dir: Path, epochs: int | None = None, seed: int | None = None, *,
               n_train: int = N_TRAIN, n_val: int = N_VAL, n_heldout: int = N_HELDOUT,
               weights_name: str = "shapes-clip.safetensors",
               meta_name: str = "shapes-clip.json") -> dict[str, object]:
    """Train and write the weights and metadata (the keywords shrink the run for tests)."""
    from safetensors.torch import save_file

    from reprogram.zoo.registry import sha256_file

    r = RECIPE
    epochs = int(epochs or r["epochs"])
    seed = int(r["seed"] if seed is None else seed)
    batch = int(r["batch"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x, texts = generate_pairs(n_train, int(r["train_seed"]), SIZE)
    ids = tokenize(texts)
    xv, yv = labelled(n_val, VAL_SEED, SHAPE_CLASSES, "shape", SIZE)
    xf = x.float() / 255.0
    mean = tuple(round(float(v), 4) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in xf.std(dim=(0, 2, 3)))
    normalize = Normalize(mean, std)
    log.info("generated %d pairs in %.1fs", n_train, time.perf_counter() - t0)
    model = ShapesCLIP(int(r["width"]), int(r["text_width"]), int(r["embed"]))
    steps = epochs * (n_train // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=float(r["lr"]),
                            weight_decay=float(r["weight_decay"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(r["lr"]), total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        for i in range(n_train // batch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = _loss(model, normalize(xf[idx]), ids[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = zero_shot_accuracy(model, normalize, xv, yv, SHAPE_CLASSES)
        log.info("epoch %d/%d  loss %.3f  zero-shot val acc %.4f  (%.0fs)", epoch + 1, epochs,
                 loss.item(), acc, time.perf_counter() - t0)
        if acc > best:
            best = acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / weights_name
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(weights))
    xh, yh = labelled(n_heldout, HELDOUT_SEED, SHAPE_CLASSES, "shape", SIZE)
    record: dict[str, object] = {
        "name": "shapes-clip", "task": "shapes-captions", "architecture": "ShapesCLIP",
        "width": int(r["width"]), "text_width": int(r["text_width"]), "embed": int(r["embed"]),
        "input_size": [SIZE, SIZE], "mean": list(mean), "std": list(std),
        "class_names": list(SHAPE_CLASSES), "template": HAND_TEMPLATE,
        "weights_sha256": sha256_file(weights),
        "heldout_accuracy": zero_shot_accuracy(model, normalize, xh, yh, SHAPE_CLASSES),
        "heldout": {"n": n_heldout, "seed": HELDOUT_SEED, "what": "zero-shot, shape names,"
                    f" template {HAND_TEMPLATE!r}"},
        "training": {"seed": seed, "epochs": epochs, "n_train": n_train,
                     "train_seed": r["train_seed"], "val_seed": VAL_SEED,
                     "best_val_accuracy": best, "seconds": round(time.perf_counter() - t0, 1),
                     "torch": torch.__version__},
    }
    (out_dir / meta_name).write_text(json.dumps(record, indent=2) + "\n")
    return record
