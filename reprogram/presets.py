"""The anchor methods as named presets, every setting spelled out and its source named.

A preset fixes every :class:`~reprogram.config.FitConfig` field that defines a method
(:data:`METHOD_FIELDS`: the program, label map, estimator, optimizer, schedule, loss, batch and
initialisation); nothing is inherited from ``FitConfig``'s defaults. What a run chooses (budget
or epochs, seed, splits, checkpoints) stays outside. ``reprogram fit --preset NAME`` and
``python -m bench.accuracy --methods NAME`` use them; each :class:`Preset` says where every
value comes from and where we could not follow the source.

Units. Our programs live in pixel space ([0, 1] images). Bahng et al.'s and BlackVIP's
additive prompts live in CLIP's normalized space (``x_norm = (x - mean) / std``); a value there
is converted with CLIP's mean channel std ``s`` (:data:`CLIP_STD`): a perturbation or an
initial spread scales by ``s`` and an SGD step size by ``s^2`` (``theta_pix = s theta_norm``
and ``dL/dtheta_norm = s dL/dtheta_pix``), so each step moves the pixels exactly as the
original moves them. Sigmoid and tanh programs (ILM-VP, BAR, Elsayed) have no such unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from reprogram.config import FitConfig
from reprogram.defaults import CONTEXT_BLACK_BOX
from reprogram.errors import ConfigError

__all__ = ["CLIP_STD", "METHOD_FIELDS", "PRESETS", "Preset", "preset_config"]

# mean of CLIP's PIXEL_STD (0.26862954, 0.26130258, 0.27577711)
CLIP_STD = (0.26862954 + 0.26130258 + 0.27577711) / 3

# what a run chooses, not the method
RUN_FIELDS = frozenset({"epochs", "budget", "eval_every", "seed", "val_fraction",
                        "test_fraction", "checkpoint", "checkpoint_every"})
METHOD_FIELDS = frozenset(f.name for f in fields(FitConfig)) - RUN_FIELDS

BAR = "yunyuntsai/Black-box-Adversarial-Reprogramming@38ebe9e"
BLACKVIP = "changdaeoh/BlackVIP@e6cfc2f"
BLACKVIP_HEAD = "changdaeoh/BlackVIP@66606fb"
BAHNG = "hjbahng/visual_prompting"
ILMVP = "OPTML-Group/ILM-VP"
BPTVLM = "BruthYU/BPT-VLM"


@dataclass(frozen=True)
class Preset:
    """A method: every method field's value, where each comes from, and what we changed."""

    name: str
    title: str
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    deviations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        missing = sorted(METHOD_FIELDS - set(self.values))
        extra = sorted(set(self.values) - METHOD_FIELDS)
        if missing or extra:
            raise ConfigError(f"preset {self.name!r}: expected every method field, missing "
                              f"{missing}, unknown {extra}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    @property
    def white_box(self) -> bool:
        return bool(self.values["estimator"] == "autograd")


def _base(**values: Any) -> dict[str, Any]:
    """The method fields no anchor sets differently from ours (listed, not inherited)."""
    out: dict[str, Any] = {"resolution": None, "mask": "none", "labelmap_lr": None,
                           "floor": 1e-6, "remainder": "share", "label_votes": 1,
                           "vote_noise": 0.1, "weight_penalty": 0.0,
                           "inner_size": None,
                           "inner_ratio": None, "patch_ratio": None, "init_std": 0.0,
                           "sources_per_target": 1, "labelmap_score": "top1",
                           "q": 10, "mu": 1.0, "antithetic": False,
                           "spsa_c": 0.05, "spsa_gamma": 0.1, "spsa_draws": 1,
                           "spsa_query_theta": True, "spsa_alpha": 0.4, "spsa_o": 1.0,
                           "cma_sigma": 0.02, "cma_popsize": 2,
                           "momentum": 0.9, "loss": {"kind": "ce", "gamma": 2.0, "alpha": 0.8},
                           "schedule": {"kind": "constant"},
                           "coordinator_encoder": "default", "coordinator_eps": 1.0,
                           "surrogate": None, "warm_start_epochs": 0, "tokens": 10}
    out.update(values)
    return out


def _bar_code() -> Preset:
    return Preset(
        "bar-code",
        "BAR as its code runs it (Tsai et al. 2020): RGF q=1 beta=0.1, BAR's focal loss, "
        "top-probability many-to-one map, Adam 0.01, tanh border around the image",
        _base(program="mask", inner_size="native", estimator="rgf", q=1, mu=0.1,
              labelmap="frequency", labelmap_score="top-prob", sources_per_target=6,
              loss={"kind": "focal-bar", "gamma": 4.0, "alpha": 0.8},
              optimizer="adam", lr=0.01, schedule={"kind": "constant"}, batch_size=10),
        {"program": f"{BAR} adv_reprogramming.py adv_program: P = tanh(W * M), X_adv = P + X",
         "inner_size": "adv_reprogramming.py: the 200x200 input padded into the 299 frame "
                       "at its own size (central_size = 200)",
         "q": "adv_reprogramming.py: q_batch = 1, num_rand_vec = 1",
         "mu": "adv_reprogramming.py: self.beta = 0.1 (W + beta * u, u l2-normalized)",
         "estimator": "estimator.py func: b_constant = d, (L(W + beta u) - L(W)) / beta * u",
         "labelmap": "mapping_func.py freq_mapping: the mean of the mlm_num sources' probs",
         "sources_per_target": "adv_reprogramming.py: self.mlm_num = 6",
         "labelmap_score": "adv_reprogramming.py: top_k(prob, 30) values summed per class, "
                           "mapping_func.py freq_idx_search divides by their count",
         "loss": "adv_reprogramming.py: cal_func.multi_focal_loss(4, 0.8, y, freq_prob)",
         "optimizer": "adv_reprogramming.py: tf.train.AdamOptimizer(0.01)",
         "lr": "adv_reprogramming.py: tf.train.AdamOptimizer(0.01)",
         "schedule": "adv_reprogramming.py: polynomial_decay(0.01 -> 0.001) is computed and "
                     "printed but never given to the optimizer: constant 0.01",
         "batch_size": "adv_reprogramming.py: self.batchsize = 10",
         "init_std": "tf.get_variable's glorot-uniform default on [1, 299, 299, 3]: "
                     "limit 0.008, about 0"},
        ("The released script steps Adam on tf.gradients of the focal loss (the line that "
         "feeds the RGF estimate is commented out): as released it trains white-box. We use "
         "the RGF estimate it computes, as the paper describes.",
         "6 sources per target need 6 * K_t source classes; on a smaller source model "
         "bench.accuracy runs it with as many as fit (1 on the default model's 10).",
         "freq_idx_search settles a source wanted by two classes by its rank; we assign "
         "greedily by score (the same for one source per target).",
         "The paper's own values (its q and step size) could not be read here; this preset "
         "follows the code only."),
    )


def _bar_port() -> Preset:
    return Preset(
        "bar-port",
        "BAR as BlackVIP's code ports it: RGF q=5 mu=0.01, focal loss gamma 2, plain SGD "
        "with polynomial decay 10 -> 0.1, sigmoid border around a 64/224 image",
        _base(program="expand", inner_ratio=64 / 224, init_std=1.0, estimator="rgf", q=5,
              mu=0.01, labelmap="frequency", loss={"kind": "focal", "gamma": 2.0, "alpha": 0.8},
              optimizer="sgd", momentum=0.0, lr=10.0,
              schedule={"kind": "poly", "lr_min": 0.1, "power": 0.9}, batch_size=128),
        {"program": f"{BLACKVIP} trainers/visual_prompters.py PROGRAM: X + sigmoid(W) * M",
         "inner_ratio": "configs/trainers/BAR/vit_b16.yaml: INPUT.SIZE (64, 64), FRAME_SIZE 224",
         "init_std": "visual_prompters.py PROGRAM: W = torch.randn(3, frame, frame)",
         "q": "vit_b16.yaml: TRAINER.BAR.SP_AVG 5",
         "mu": "vit_b16.yaml: TRAINER.BAR.SMOOTH 0.01",
         "loss": "trainers/reprogramming.py: FocalLoss(FOCAL_G), vit_b16.yaml FOCAL_G 2.0",
         "optimizer": "trainers/reprogramming.py: w_new = w - ak * ghat (no momentum)",
         "momentum": "trainers/reprogramming.py: w_new = w - ak * ghat (no momentum)",
         "lr": "vit_b16.yaml: TRAINER.BAR.LRS [10.0, 0.1]",
         "schedule": "trainers/reprogramming.py: (init - min)(1 - t / (0.9 T))^0.9 + min",
         "batch_size": "vit_b16.yaml: DATALOADER.TRAIN_X.BATCH_SIZE 128"},
        ("BlackVIP's BAR reads CLIP's zero-shot text head over the target classes; a source "
         "classifier has no such head, so the frequency map (top-1 counts) stands in.",),
    )


def _blackvip_vp() -> Preset:
    s = CLIP_STD
    return Preset(
        "blackvip-vp",
        "BlackVIP's optimizer on a pixel prompt, not BlackVIP: SPSA-GC with 5 draws and no "
        "query at theta on Bahng's padding prompt (BlackVIP's VPOUR trainer); no Coordinator",
        _base(program="add-pad", patch_ratio=30 / 224, init_std=s, estimator="spsa",
              spsa_c=0.01 * s, spsa_gamma=0.1, spsa_draws=5, spsa_query_theta=False,
              optimizer="spsa-gc", lr=40.0 * s * s, spsa_alpha=0.5, spsa_o=1.0, momentum=0.9,
              labelmap="frequency", batch_size=128),
        {"program": f"{BLACKVIP} trainers/visual_prompters.py PadPrompter: x + prompt",
         "patch_ratio": "configs/trainers/VPOUR/vit_b16.yaml: PROMPT_SIZE 30, IMAGE_SIZE 224",
         "init_std": "PadPrompter: torch.randn pads (std 1 in CLIP's normalized space)",
         "spsa_c": "VPOUR/vit_b16.yaml SPSA_PARAMS [o 1.0, c 0.01, a 40.0, alpha 0.5, "
                   "gamma 0.1]",
         "spsa_draws": "VPOUR/vit_b16.yaml: SP_AVG 5",
         "estimator": "trainers/vpour.py spsa_grad_estimate_bi: two-sided SPSA, segmented "
                      "uniform perturbations",
         "optimizer": "VPOUR/vit_b16.yaml: OPT_TYPE spsa-gc",
         "spsa_alpha": "SPSA_PARAMS alpha 0.5 (ak = a / (step + o)^alpha)",
         "spsa_query_theta": "trainers/vpour.py spsa_grad_estimate_bi: only w + ck*D and "
                             "w - ck*D are evaluated",
         "momentum": "VPOUR/vit_b16.yaml: MOMS 0.9 (m = b1 m + g; w -= ak (g + b1 m))",
         "lr": "SPSA_PARAMS a = 40.0 (normalized space)",
         "batch_size": "VPOUR/vit_b16.yaml: DATALOADER.TRAIN_X.BATCH_SIZE 128"},
        ("BlackVIP proper learns a Coordinator (a frozen pretrained encoder and a decoder that "
         "generates an input-dependent prompt); it is not built here, so this row measures "
         "BlackVIP's optimizer on a pixel prompt, as BlackVIP's own VPOUR baseline does.",
         "VPOUR reads CLIP's zero-shot text head; the frequency map (top-1 counts) stands in.",
         "c, a and the initial spread are converted from CLIP's normalized space to pixels "
         f"(c {0.01 * s:.5f}, a {40 * s * s:.4f}, init std {s:.4f}; module docstring)."),
    )


def _blackvip() -> Preset:
    s = CLIP_STD
    yaml = "configs/trainers/BLACKVIP/vit_b16.yaml"
    svhn = "README.md: sh tl_bench.sh svhn 5000 0.9 0.2 0.005 1.0 (moms, gamma, c, p_eps)"
    return Preset(
        "blackvip",
        "BlackVIP (Oh et al. 2023): the Coordinator (frozen encoder, decoder of an "
        "input-dependent prompt) learned by SPSA-GC with 5 draws and no query at theta",
        _base(program="coordinator", coordinator_encoder="default", coordinator_eps=1.0 * s,
              estimator="spsa", spsa_c=0.005, spsa_gamma=0.2, spsa_draws=5,
              spsa_query_theta=False, optimizer="spsa-gc", lr=0.01, spsa_alpha=0.4,
              spsa_o=1.0, momentum=0.9, labelmap="frequency", batch_size=128),
        {"program": f"{BLACKVIP_HEAD} trainers/blackvip.py CustomCLIP.forward: "
                    "clip_clipping(image + p_eps * coordinator(image))",
         "coordinator_encoder": f"{yaml}: PT_BACKBONE vit-mae-base (a frozen pretrained "
                                "encoder; here the model the user names)",
         "coordinator_eps": f"{svhn}; P_EPS 1.0 in CLIP's normalized space",
         "spsa_c": svhn, "spsa_gamma": svhn, "momentum": svhn,
         "spsa_draws": f"{yaml}: SP_AVG 5",
         "estimator": "trainers/blackvip.py spsa_grad_estimate_bi: two-sided SPSA, segmented "
                      "uniform perturbations",
         "spsa_query_theta": "trainers/blackvip.py spsa_grad_estimate_bi: only w + ck*D and "
                             "w - ck*D are evaluated",
         "optimizer": f"{yaml}: OPT_TYPE spsa-gc",
         "lr": "scripts/blackvip/tl_bench.sh: spsa_a=0.01 (SPSA_PARAMS [o 1.0, c, a 0.01, "
               "alpha 0.4, gamma])",
         "spsa_alpha": "scripts/blackvip/tl_bench.sh: alpha=0.4",
         "spsa_o": "scripts/blackvip/tl_bench.sh: spsa_os=1.0",
         "loss": "trainers/blackvip.py: self.loss_fn = F.cross_entropy",
         "batch_size": f"{yaml}: DATALOADER.TRAIN_X.BATCH_SIZE 128"},
        ("The encoder is the model named by coordinator_encoder (the zoo's default CNN unless "
         "told), not MAE's ViT-B: nothing is downloaded. Its feature is the input of the "
         "model's last linear layer, as BlackVIP takes MAE's [CLS] token.",
         "The decoder is BlackVIP's (vit-base arch) with the cube at ceil(side / 32) cells "
         "and channels sized to hold the feature twice (32 x 7 x 7 at BlackVIP's setting); "
         "see reprogram.coordinator.",
         "BlackVIP reads CLIP's zero-shot text head; the frequency map (top-1 counts) stands "
         "in.",
         f"p_eps converted to pixels ({s:.4f}); c and a act on the decoder's weights, which "
         "have no pixel unit, and are kept. The values are the README's SVHN run (the "
         "digits task here), the rest the config file."),
    )


def _elsayed() -> Preset:
    return Preset(
        "elsayed",
        "Elsayed et al. 2019: tanh(W * M) border around the image at native size, "
        "lambda ||W||^2, first-classes map, Adam, white-box",
        _base(program="mask", inner_size="native", estimator="autograd", labelmap="first",
              weight_penalty=0.05, optimizer="adam", lr=0.05,
              schedule={"kind": "exponential", "gamma": 0.96, "decay_epochs": 2},
              batch_size=50),
        {"program": "Elsayed et al. 2019, Sec. 3: X_adv = h_f(X~ + tanh(W * M)), the target "
                    "image embedded unscaled in the centre",
         "labelmap": "Sec. 3: the first K_t ImageNet labels stand for the target classes",
         "estimator": "Sec. 3: gradients through the network (white-box)",
         "inner_size": "Sec. 3: the target image embedded at its own size, no resizing",
         "weight_penalty": "Sec. 3: argmin -log P(h_g(y) | X_adv) + lambda ||W||_F^2",
         "optimizer": "Sec. 4: Adam", "lr": "appendix hyper-parameter table (MNIST)",
         "schedule": "appendix: learning rate decay 0.96 every 2 epochs",
         "batch_size": "appendix: batch size 50"},
        ("The appendix table's values (lambda 0.05, lr 0.05, decay 0.96 per 2 epochs, batch "
         "50 for MNIST) are as we recall them; its text could not be re-read here.",),
    )


def _bahng(kind: str) -> Preset:
    s = CLIP_STD
    program = "add-pad" if kind == "pad" else "add-patch"
    return Preset(
        f"bahng-{kind}",
        f"Bahng et al. 2022: a {'padding' if kind == 'pad' else 'fixed patch'} prompt added "
        "to the full-size image, SGD 40 with warm-up and cosine, white-box",
        _base(program=program, patch_ratio=30 / 224, init_std=s, estimator="autograd",
              labelmap="first", optimizer="sgd", lr=40.0 * s * s, momentum=0.9,
              schedule={"kind": "warmup-cosine", "warmup_steps": 1000}, batch_size=256),
        {"program": f"{BAHNG} models/prompters.py PadPrompter / FixedPatchPrompter: x + prompt",
         "patch_ratio": "main_clip.py: --prompt_size 30, --image_size 224",
         "init_std": "prompters.py: torch.randn (std 1 in CLIP's normalized space)",
         "optimizer": "main_clip.py: torch.optim.SGD(momentum=0.9, weight_decay=0)",
         "estimator": "main_clip.py: loss.backward() through CLIP (white-box)",
         "labelmap": "no label map in the source (CLIP's text head); see deviations",
         "lr": "main_clip.py: --learning_rate 40 (normalized space)",
         "schedule": "main_clip.py: cosine_lr(optimizer, lr, warmup=1000, total_steps)",
         "batch_size": "main_clip.py: --batch_size 256"},
        ("Bahng et al. read CLIP's text head over the target classes; a source classifier "
         "has none, so the first K_t source classes stand in (Elsayed et al.'s map).",
         f"lr and the initial spread converted to pixels: lr {40 * s * s:.4f}, std {s:.4f}."),
    )


def _bpt_vlm() -> Preset:
    yaml = "configs/shallow_prompt.yaml"
    return Preset(
        "bpt-vlm",
        "BPT-VLM's text half (Yu et al. 2023): 8 context vectors before the class name, "
        "searched by CMA-ES (population 30) through the API's context input, loss values only",
        _base(program="coop", estimator="cma", lr=0.05, **CONTEXT_BLACK_BOX),
        {"program": f"{BPTVLM} model/Shallow_Prompt_CLIP.py get_text_information: prompts "
                    "'X X ... X name.', the X embeddings replaced by the learned vectors",
         "tokens": f"{yaml}: n_prompt_tokens_L 8",
         "estimator": f"{BPTVLM} BBT_VL_Shallow.py --opt shallow_cma: CMA-ES (pycma)",
         "cma_popsize": f"{yaml}: popsize 30",
         "cma_sigma": f"{yaml}: sigma 1 on z, with the projection A ~ N(0, std_hat / "
                      "(sqrt(d) sigma)) (Shallow_Prompt_CLIP.py __init__, std_hat the token "
                      "embedding's std): each prompt entry moves by std_hat; here 0.86, "
                      "the std of shapes-clip's clip.text.token.weight (0.8615)",
         "loss": f"{yaml}: loss_type ce",
         "labelmap": "the zero-shot head: class k is the k-th name (logits over the prompts)",
         "batch_size": f"{yaml}: batch_size 64",
         "optimizer": "CMA-ES sets the prompt to its mean (no gradient step)"},
        ("BPT-VLM searches a 500-dimensional z mapped by a fixed random matrix to the 8 x 512 "
         "prompt; shapes-clip's prompt is 8 x 64 = 512 numbers, already that small, so "
         "CMA-ES searches it directly, with the same per-entry spread.",
         "Its vision half (5 prompt tokens inside CLIP's image encoder) is not learned: the "
         "API takes text context only (reprogram-server --context-input).",
         "Each generation is scored on one mini-batch of 64, not the whole few-shot training "
         "set, so that a budget counted in image evaluations buys more generations; the "
         "mean's loss on the same batch is evaluated too (our CMA-ES step).",
         "The prompt starts at CoOp's N(0, 0.02^2) draw, not exactly at zero (A z with z = 0)."),
    )


def _ilm_vp() -> Preset:
    return Preset(
        "ilm-vp",
        "ILM-VP (Chen et al. 2023): sigmoid border around the image at native size, the "
        "iterative frequency map, Adam 0.01, steps at 50% and 72%, white-box",
        _base(program="expand", inner_size="native", estimator="autograd",
              labelmap="iterative", optimizer="adam", lr=0.01,
              schedule={"kind": "multistep", "milestones": (0.5, 0.72), "gamma": 0.1},
              batch_size=128),
        {"program": f"{ILMVP} models/visual_prompt.py ExpansiveVisualPrompt: "
                    "pad(x) + sigmoid(program) * mask",
         "init_std": "ExpansiveVisualPrompt(init='zero')",
         "inner_size": "experiments/cnn/ilm_vp.py: CIFAR-10 kept at 32 px in the 224 frame",
         "labelmap": "ilm_vp.py: generate_label_mapping_by_frequency every epoch "
                     "(--mapping-interval 1)",
         "optimizer": "ilm_vp.py: torch.optim.Adam, --lr 0.01",
         "lr": "ilm_vp.py: --lr default 0.01",
         "estimator": "ilm_vp.py: scaler.scale(loss).backward() (white-box)",
         "schedule": "ilm_vp.py: MultiStepLR(milestones=[0.5 * epochs, 0.72 * epochs], "
                     "gamma=0.1)",
         "batch_size": "data/prepare_data.py: batch size 128"},
        ("The milestones are fractions of the fit's planned steps (ILM-VP counts epochs).",),
    )


PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (
    _bar_code(), _bar_port(), _blackvip(), _blackvip_vp(), _elsayed(), _bahng("pad"),
    _bahng("patch"), _ilm_vp(), _bpt_vlm())})


def preset_config(name: str, **run: Any) -> FitConfig:
    """A :class:`FitConfig` from preset ``name`` and run settings (budget, seed, ...); a
    method field among ``run`` overrides the preset (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"expected a preset among {sorted(PRESETS)}, got {name!r}")
    values = dict(PRESETS[name].values)
    values.update({k: v for k, v in run.items() if v is not None})
    return FitConfig(**values)
