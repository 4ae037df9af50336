"""``reprogram``: fit, evaluate, apply and inspect prompts from the command line.

This module only parses arguments into configs and calls the library; every error the user
can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from reprogram.defaults import CMA_MAX_BUDGET
from reprogram.endpoint_args import add_endpoint_args, http_oracle, wire
from reprogram.errors import ReprogramError
from reprogram.http_transport import SERVE_RETRY
from reprogram.presets import PRESETS
from reprogram.remote import add_jobs_parser, cmd_jobs
from reprogram.serving import add_serve_parser, cmd_serve

log = logging.getLogger("reprogram")
PRESET_NAMES = tuple(PRESETS)
EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source model (one of)")
    g.add_argument("--model", default=None,
                   help="local model: 'default' (shipped), 'torchvision:ARCH' (with "
                        "--weights), or the path of a model folder, model config or "
                        "TorchScript/ONNX file with its config (default: 'default' when no "
                        "--endpoint)")
    g.add_argument("--weights", default=None, help="state-dict file for --model torchvision:ARCH")
    g.add_argument("--endpoint", default=None,
                   help="URL of an Open Inference Protocol (KServe V2) server")
    g.add_argument("--endpoint-model", default=None,
                   help="model name on the endpoint (default: the only/first model)")
    g.add_argument("--api-key", default=None,
                   help="API key for the endpoint (default: $REPROGRAM_API_KEY)")
    g.add_argument("--output", default=None,
                   help="what the model reveals: probs, logits, topk:K, topk-names:K, label "
                        "(a local model emulates it, default probs; an endpoint's is read "
                        "from its metadata or answers unless given)")
    g.add_argument("--wire", "--image-format", type=wire, default="uint8",
                   help="what is sent to the model: uint8, fp32 (tensors), png, jpeg:Q "
                        "(image files; a local model emulates JPEG) (default: uint8)")
    g.add_argument("--max-requests", type=int, default=None,
                   help="cap on the number of model requests (default: no cap)")
    g.add_argument("--template", default=None,
                   help="a zero-shot (vision-language) model's class prompt, with {} for the"
                        " class name (default: the model's, 'a photo of a {}.')")
    add_endpoint_args(p.add_argument_group("endpoint (what its metadata leaves out)"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reprogram", description="Fit, evaluate, apply, inspect and serve "
                     "prompts that reprogram a frozen image classifier.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="learn a prompt (program + label map) for a dataset")
    _model_args(f)
    f.add_argument("--data", required=True, help="'digits', 'squares' or a class-per-folder dir")
    f.add_argument("--out", default="prompt.safetensors", help="artifact path")
    f.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help="an anchor method with every setting as its paper's code sets it "
                        "(bar-code, bar-port, blackvip, blackvip-vp: black-box; elsayed, "
                        "bahng-pad, bahng-patch, ilm-vp: white-box); options given here "
                        "override it")
    f.add_argument("--program", default=None,
                   choices=("expand", "add-pad", "add-patch", "mask", "patch", "full",
                            "coordinator", "vpt-shallow", "vpt-deep", "coop", "coop-csc", "pad"),
                   help="expand: sigmoid border around a shrunk image (ILM-VP); add-pad / "
                        "add-patch: border / corner patch added to the full-size image (Bahng "
                        "et al.); mask: tanh border around the image at native size (Elsayed "
                        "et al.; --weight-penalty is its lambda); patch: corner patch replacing "
                        "the image's; full: overlay on the whole frame; coordinator: BlackVIP's "
                        "input-dependent prompt from a frozen encoder (--coordinator-encoder); "
                        "vpt-shallow / vpt-deep: VPT's prompt tokens in the first / every layer "
                        "of a local ViT (--tokens N; white-box); coop / coop-csc: CoOp's "
                        "context vectors, shared / one set per class, in a "
                        "vision-language model's text prompt (--tokens M; white-box on a local "
                        "model, CMA-ES as BPT-VLM over an endpoint with a context input); "
                        "pad: deprecated alias "
                        "of expand, removed in the next release (default: expand for autograd, "
                        "full for rgf/spsa)")
    f.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="vpt-shallow / vpt-deep: prompt tokens per layer (default 10); coop /"
                        " coop-csc: context vectors M (default 16; 8 over an endpoint)")
    f.add_argument("--coordinator-encoder", default=None, metavar="MODEL",
                   help="coordinator: the frozen local model whose features drive the "
                        "prompt: 'default' (the zoo's, the default) or a model folder, config "
                        "or file; the server that applies the prompt needs it too")
    f.add_argument("--coordinator-eps", type=float, default=None, metavar="EPS",
                   help="coordinator: the prompt's scale in pixels (default 1.0)")
    f.add_argument("--weight-penalty", type=float, default=None, metavar="LAMBDA",
                   help="add LAMBDA * ||theta||^2 to the loss (Elsayed et al.; default 0)")
    f.add_argument("--inner-size", type=int, default=None,
                   help="side of the resized target image (default: the frame for full and "
                        "the full-image kinds, half the frame for expand/mask)")
    f.add_argument("--scale", default=None, metavar="auto|S",
                   help="size the target image as AutoVP does: S times 128/224 of the frame "
                        "(expand/full programs); 'auto' searches 0.5, 1, 1.5 on validation with "
                        "30%% of the budget (instead of --inner-size)")
    f.add_argument("--resolution", type=int, default=None,
                   help="learn the program on an RxR grid upsampled to the frame")
    f.add_argument("--labelmap", default=None,
                   choices=("first", "random", "frequency", "iterative", "linear", "head"),
                   help="source-to-target label mapping (default: linear, learned); head: "
                        "VPT's linear head on a ViT's class token (token programs)")
    f.add_argument("--sources-per-target", type=int, default=None)
    f.add_argument("--surrogate", default=None, metavar="MODEL",
                   help="a local model of the same kind as the API's (e.g. shapes-resnet, "
                        "torchvision:ARCH, a model folder): its exact gradient guides the "
                        "black-box estimate (P-RGF) and a white-box fit on it starts the fit; "
                        "its queries are free and counted apart")
    f.add_argument("--surrogate-use", choices=("warm", "prior", "both"), default="warm",
                   help="with --surrogate: the warm start (default; it learned best per query "
                        "on validation), the prior (estimator prgf), or both")
    f.add_argument("--warm-start-epochs", type=int, default=None, metavar="N",
                   help="epochs of the white-box warm start on the surrogate (default 20)")
    f.add_argument("--estimator", choices=("autograd", "rgf", "spsa", "prgf", "cma"),
                   default=None,
                   help="gradient estimator (default: autograd for a local model; for an "
                        "endpoint or an ONNX model cma up to a budget of "
                        f"{CMA_MAX_BUDGET:,} queries on full scores, else rgf); cma: CMA-ES, "
                        "one generation a step")
    f.add_argument("--q", type=int, default=None, help="RGF directions per step")
    f.add_argument("--mu", type=float, default=None, help="RGF smoothing radius")
    f.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=None)
    f.add_argument("--spsa-c", type=float, default=None, help="SPSA perturbation size c")
    f.add_argument("--cma-sigma", type=float, default=None,
                   help="CMA-ES initial spread (default 0.5)")
    f.add_argument("--cma-popsize", type=int, default=None,
                   help="CMA-ES candidates per step (default 20)")
    f.add_argument("--remainder", choices=("share", "floor"), default=None,
                   help="what a top-k answer's missing classes score: an equal share of the "
                        "mass it leaves (default) or a flat 1e-6")
    f.add_argument("--label-votes", type=int, default=None, metavar="V",
                   help="for a label-only API: send every training image V times with noise "
                        "and learn from the answers' fractions (default 8 when the API "
                        "answers labels, else 1)")
    f.add_argument("--vote-noise", type=float, default=None, metavar="STD",
                   help="std of the noise added to each voting copy (default 0.1)")
    f.add_argument("--optimizer", choices=("adam", "sgd", "spsa-gc", "cma"), default=None,
                   help="cma goes with --estimator cma (the default for it)")
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--epochs", type=int, default=None)
    f.add_argument("--budget", type=int, default=None,
                   help="image queries (training + validation) the fit may spend")
    f.add_argument("--eval-every", type=int, default=None, help="steps between validations")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--val-fraction", type=float, default=0.15)
    f.add_argument("--test-fraction", type=float, default=0.25)
    f.add_argument("--checkpoint", default=None,
                   help="checkpoint path (default: OUT with .ckpt suffix)")
    f.add_argument("--checkpoint-every", type=int, default=100)
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("--on-server", action="store_true",
                   help="with --endpoint: the server fits white-box on its own weights as a "
                        "tuning job (it needs --fit-workers); the prompt is hosted there")

    e = sub.add_parser("eval", help="accuracy of a prompt on a dataset split")
    _model_args(e)
    e.add_argument("--prompt", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                   help="split made with the prompt's own seed and fractions (default: test)")

    a = sub.add_parser("apply", help="classify image files with a prompt")
    _model_args(a)
    a.add_argument("--prompt", required=True)
    a.add_argument("--top-k", type=int, default=3)
    a.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")

    i = sub.add_parser("inspect", help="print a prompt's metadata; optionally draw it")
    i.add_argument("prompt")
    i.add_argument("--png", default=None, help="write a picture of the program to this file")
    i.add_argument("--data", default=None, help="dataset for sample images in the picture")

    add_serve_parser(sub, _model_args)
    add_jobs_parser(sub, _model_args)
    return parser


def make_oracle(args: argparse.Namespace, budget: int | None = None) -> Any:
    """A LocalOracle for --model, an HttpOracle for --endpoint."""
    from reprogram.errors import ConfigError

    if args.endpoint and args.model:
        raise ConfigError("expected --model or --endpoint, got both")
    if args.endpoint:
        if getattr(args, "program", None) in ("vpt-shallow", "vpt-deep"):
            from reprogram.oracles import TOKENS_NEED_WEIGHTS

            raise ConfigError(TOKENS_NEED_WEIGHTS)
        retry = SERVE_RETRY if args.command == "serve" else None
        return http_oracle(args, budget=budget, retry=retry)
    from reprogram.oracles import LocalOracle
    from reprogram.zoo.registry import load_model

    model = load_model(args.model or "default", args.weights)
    template = getattr(args, "template", None)
    if template is not None:
        from reprogram.vlm import with_classes

        model = with_classes(model, model.meta.class_names, template)
    return LocalOracle(model, output=args.output or "probs", wire=args.wire, budget=budget,
                       max_requests=args.max_requests, max_classes=args.max_classes)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``reprogram`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from reprogram import commands

    try:
        if args.command == "inspect":
            return commands.cmd_inspect(args)
        if args.command == "jobs":
            return cmd_jobs(args)
        if args.command == "fit" and args.on_server:
            return commands.cmd_fit_on_server(args)
        oracle = make_oracle(args)
        handler = {"fit": commands.cmd_fit, "eval": commands.cmd_eval,
                   "apply": commands.cmd_apply, "serve": cmd_serve}[args.command]
        return handler(args, oracle)
    except ReprogramError as exc:
        print(f"reprogram {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"reprogram {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, torch.cuda.OutOfMemoryError) as exc:
        print(f"reprogram {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
