"""Train, or evaluate, the zoo's models.

    python -m reprogram.zoo.train                     # retrain the default model (fixed seed)
    python -m reprogram.zoo.train --model shapes-resnet   # a small ResNet (a surrogate)
    python -m reprogram.zoo.train --model shapes-vit      # a small ViT (for prompt tokens)
    python -m reprogram.zoo.train --model shapes-clip     # a CLIP-style model (zero-shot, CoOp)
    python -m reprogram.zoo.train --evaluate          # held-out accuracy and sha256 as shipped

Training takes a few minutes on 2 CPU cores (each model's record says how long). The held-out
set is 2,000 freshly generated images from a seed never used in training or model selection.
``shapes-resnet`` is another architecture (:class:`~reprogram.zoo.net.ShapesResNet`) trained on
the same task from other training images and another initialization seed: a public model of
the same kind as an API's, never the API's own weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reprogram.zoo.net import ARCHITECTURES
from reprogram.zoo.registry import ZOO, load_zoo, sha256_file, zoo_paths
from reprogram.zoo.shapes import SHAPE_CLASSES, generate_shapes

log = logging.getLogger(__name__)

SIZE = 32
WIDTH = 24
TRAIN_SEED, VAL_SEED, HELDOUT_SEED = 1, 2, 20261127
N_TRAIN, N_VAL, N_HELDOUT = 60_000, 2_000, 2_000
# per zoo model: architecture, width, training-image seed, initialization seed
RECIPES: dict[str, dict[str, object]] = {
    "default": {"architecture": "ShapesNet", "width": WIDTH, "train_seed": TRAIN_SEED,
                "seed": 0},
    "shapes-resnet": {"architecture": "ShapesResNet", "width": 16, "train_seed": 11, "seed": 1},
    # a transformer wants a smaller peak rate and more weight decay than the CNNs
    "shapes-vit": {"architecture": "ShapesViT", "width": 64, "train_seed": 21, "seed": 2,
                   "lr": 1e-3, "weight_decay": 0.05, "epochs": 10},
}
DEFAULT_EPOCHS = 8


@torch.inference_mode()
def accuracy(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``module`` (inputs in [0,1]) on uint8 images ``x``."""
    module.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = module(x[i : i + batch].float() / 255.0)
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct / max(len(x), 1)


def heldout_set(n: int = N_HELDOUT) -> tuple[torch.Tensor, torch.Tensor]:
    return generate_shapes(n, HELDOUT_SEED, SIZE)


def train(out_dir: Path, epochs: int, seed: int | None = None, *, name: str = "default",
          n_train: int = N_TRAIN, n_val: int = N_VAL, n_heldout: int = N_HELDOUT,
          batch: int = 128) -> dict[str, object]:
    """Train zoo model ``name`` and write its weights and metadata into ``out_dir``.

    The keyword arguments shrink the run for tests; the defaults reproduce the shipped model
    (``seed`` None: the recipe's).
    """
    recipe = RECIPES[name]
    seed = int(recipe["seed"]) if seed is None else seed  # type: ignore[call-overload]
    train_seed = int(recipe["train_seed"])  # type: ignore[call-overload]
    width = int(recipe["width"])  # type: ignore[call-overload]
    arch = str(recipe["architecture"])
    if n_train < batch:
        raise ValueError(f"expected n_train >= batch ({batch}), got {n_train}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    xtr, ytr = generate_shapes(n_train, train_seed, SIZE)
    xva, yva = generate_shapes(n_val, VAL_SEED, SIZE)
    xf = xtr.float() / 255.0
    mean = tuple(round(float(v), 4) for v in xf.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in xf.std(dim=(0, 2, 3)))
    log.info("generated %d training images in %.1fs", n_train, time.perf_counter() - t0)

    from reprogram.zoo.net import Normalize

    net = ARCHITECTURES[arch](num_classes=len(SHAPE_CLASSES), width=width)
    model = torch.nn.Sequential(Normalize(mean, std), net)
    steps = epochs * (n_train // batch)
    lr = float(recipe.get("lr", 3e-3))  # type: ignore[arg-type]
    wd = float(recipe.get("weight_decay", 5e-4))  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        for i in range(n_train // batch):
            idx = perm[i * batch : (i + 1) * batch]
            xb = xf[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, xva, yva)
        log.info("epoch %d/%d  loss %.3f  val acc %.4f  (%.0fs)", epoch + 1, epochs,
                 loss.item(), acc, time.perf_counter() - t0)
        if acc > best:
            best = acc
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_name, meta_name = ZOO[name]
    weights = out_dir / weights_name
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(weights))
    xh, yh = heldout_set(n_heldout)
    record: dict[str, object] = {
        "name": name,
        "task": "shapes",
        "architecture": arch,
        "width": width,
        "input_size": [SIZE, SIZE],
        "mean": list(mean),
        "std": list(std),
        "class_names": list(SHAPE_CLASSES),
        "weights_sha256": sha256_file(weights),
        "heldout_accuracy": accuracy(model, xh, yh),
        "heldout": {"n": n_heldout, "seed": HELDOUT_SEED},
        "training": {"seed": seed, "epochs": epochs, "n_train": n_train, "train_seed": train_seed,
                     "val_seed": VAL_SEED, "best_val_accuracy": best,
                     "seconds": round(time.perf_counter() - t0, 1),
                     "torch": torch.__version__},
    }
    (out_dir / meta_name).write_text(json.dumps(record, indent=2) + "\n")
    return record


def evaluate(name: str = "default") -> dict[str, object]:
    """Held-out accuracy and sha256 of the shipped weights (checked against the metadata)."""
    weights, meta_path = zoo_paths(name)
    record = json.loads(meta_path.read_text())
    model = load_zoo(name)  # raises if the sha256 does not match
    if record.get("architecture") == "ShapesCLIP":  # zero-shot, on its own world's images
        from reprogram.zoo.captions import labelled
        from reprogram.zoo.train_clip import HELDOUT_SEED as CLIP_HELDOUT

        xh, yh = labelled(N_HELDOUT, CLIP_HELDOUT, SHAPE_CLASSES, "shape", SIZE)
    else:
        xh, yh = heldout_set()
    return {
        "heldout_accuracy": accuracy(model.module, xh, yh),
        "recorded_heldout_accuracy": record["heldout_accuracy"],
        "weights_sha256": sha256_file(weights),
        "recorded_weights_sha256": record["weights_sha256"],
        "sha256_matches": sha256_file(weights) == record["weights_sha256"],
        "heldout_images": N_HELDOUT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprogram.zoo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*RECIPES, "shapes-clip"), default="default",
                        help="which zoo model (default: the default model)")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the shipped model")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the package's zoo folder)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the model's recipe, else "
                             f"{DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=None,
                        help="initialization seed (default: the model's recipe)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.evaluate:
        res = evaluate(args.model)
        print(json.dumps(res, indent=2))
        return 0 if res["sha256_matches"] else 1
    if args.model == "shapes-clip":
        from reprogram.zoo.train_clip import train_clip

        record = train_clip(args.out or zoo_paths("default")[0].parent, args.epochs, args.seed)
        print(json.dumps({k: record[k] for k in ("heldout_accuracy", "weights_sha256")},
                         indent=2))
        return 0
    out = args.out or zoo_paths(args.model)[0].parent
    recipe_epochs = RECIPES[args.model].get("epochs", DEFAULT_EPOCHS)
    epochs = args.epochs or int(recipe_epochs)  # type: ignore[call-overload]
    record = train(out, epochs, args.seed, name=args.model)
    print(json.dumps({k: record[k] for k in ("heldout_accuracy", "weights_sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
