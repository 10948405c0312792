"""mgpu.train_clip's command line: every flag with its help text and default, the presets, and the checks
argparse can make (open_clip's params.py)."""

from __future__ import annotations

import argparse
import difflib
import math
import sys
import re
from pathlib import Path

from .models import IMAGE_ENCODERS, TEXT_ENCODERS

PRESETS = {
    # One configuration in about a minute on a 2-core CPU: val image->text R@1 above 0.5 (chance: 1/256).
    "demo": dict(image_encoder="starnet_s050", text_encoder="clip:tiny", data="synthetic", image_size=32,
                 embed_dim=128, batch_size=64, lr=3e-3, weight_decay=0.1, warmup=20, max_steps=220,
                 train_size=2048, val_size=256, workers=0, lr_scale="none"),
    # The real towers at full resolution, for a GPU: bf16, batch 128 per process.
    "full": dict(image_encoder="starnet_s1", text_encoder="clip:ViT-B/32", data="synthetic", image_size=224,
                 embed_dim=512, batch_size=128, lr=5e-4, weight_decay=0.2, warmup=500, epochs=10,
                 train_size=100_000, val_size=1000, workers=None, amp="bf16"),
}
IMAGE_STRIDE = 32  # StarNet halves the resolution five times
OUTPUT_ROOT = Path("checkpoints/clip_models")  # run_train_clip.sh's CKPT_DIR default: one folder for both


class _Help(argparse.HelpFormatter):
    """Every flag's help ends with its default, in words for switches and unset values, unless the help
    text already says it ("default: ...")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            shown = "off"
        elif isinstance(action, argparse._StoreFalseAction):
            shown = "on"
        elif action.default is None:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def safe_name(text: str) -> str:
    """run_train_clip.sh's grid::safe_name: [A-Za-z0-9._-] kept, anything else '_', no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    while name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def default_output_dir(image_encoder: str, text_encoder: str) -> str:
    """Where the trainer writes when --output-dir is not given: the folder run_train_clip.sh gives the
    same configuration (checkpoints/clip_models/<image>_<text>)."""
    return str(OUTPUT_ROOT / safe_name(f"{image_encoder}_{text_encoder}"))


def _number(kind, low: float, inclusive: bool = True, what: str = ""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (value == low and not inclusive) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'at least' if inclusive else 'more than'} {low}{what}")
        return value
    return parse


def _encoder(table: dict, kind: str):
    def parse(text: str) -> str:
        if text not in table:
            raise argparse.ArgumentTypeError(f"unknown {kind} encoder {text!r}; known: {', '.join(table)}")
        return text
    return parse


def _model_flags(p: argparse.ArgumentParser, pos_int, nonneg_int) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--image-encoder", type=_encoder(IMAGE_ENCODERS, "image"), default="starnet_s1",
                   help=f"image tower: {', '.join(IMAGE_ENCODERS)}")
    m.add_argument("--text-encoder", type=_encoder(TEXT_ENCODERS, "text"), default="clip:ViT-B/32",
                   help=f"text tower: {', '.join(TEXT_ENCODERS)}")
    m.add_argument("--embed-dim", type=pos_int, default=512, help="shared embedding size of the CLIP head")
    m.add_argument("--image-pretrained", metavar="PATH", help="local StarNet weights (official release layout)")
    m.add_argument("--text-pretrained", metavar="PATH",
                   help="local text weights: OpenAI/open_clip .pt, or a Hugging Face BERT file or folder")
    m.add_argument("--clip-vocab", metavar="PATH",
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz, file or folder (default: open_clip's if installed, "
                        "else merges learned from the captions)")
    m.add_argument("--bert-vocab", metavar="PATH",
                   help="BERT's vocab.txt, file or model folder (default: the captions' characters)")
    m.add_argument("--lock-image", action="store_true",
                   help="freeze the image tower (weights and BatchNorm statistics); the projection still trains")
    m.add_argument("--lock-image-unlocked", type=nonneg_int, default=0, metavar="N",
                   help="with --lock-image: the last N blocks (and the final norm) stay trainable")
    m.add_argument("--lock-text", action="store_true",
                   help="freeze the text tower; the projection still trains")
    m.add_argument("--lock-text-unlocked", type=nonneg_int, default=0, metavar="N",
                   help="with --lock-text: the last N transformer layers (and the final norm or pooler) stay trainable")


def _data_flags(p: argparse.ArgumentParser, pos_int, nonneg_int) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic", help="'synthetic' (embedded), or a .csv, .tsv or .jsonl file")
    d.add_argument("--val-data", metavar="FILE", help="validation file (default: --val-fraction of --data)")
    d.add_argument("--val-fraction", type=_number(float, 0, False), default=0.05,
                   help="share of --data held out for validation when --val-data is not given")
    d.add_argument("--train-size", type=pos_int, default=20_000, help="synthetic: training samples")
    d.add_argument("--val-size", type=pos_int, default=1000, help="synthetic: validation samples")
    d.add_argument("--csv-img-key", default="filepath", help="column (or JSONL key) of the image path")
    d.add_argument("--csv-caption-key", default="title", help="column (or JSONL key) of the caption")
    d.add_argument("--csv-separator", default=None, help="default: ',' for .csv, a tab for .tsv")
    d.add_argument("--box-file", metavar="FILE", help="JSON boxes per image (see mgpu.data.captions)")
    d.add_argument("--max-bad-images", type=_number(float, 0), default=0.01, metavar="FRACTION",
                   help="fail when more than this fraction of the images read so far is missing or unreadable")
    d.add_argument("--image-size", type=pos_int, default=224, help=f"pixels, a multiple of {IMAGE_STRIDE}")
    d.add_argument("--workers", type=nonneg_int, default=None,
                   help="DataLoader worker processes per process (default: auto, CPU cores / local processes, "
                        "at most 8)")


def _training_flags(p: argparse.ArgumentParser, pos_int, nonneg_int) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--epochs", "--num-epochs", type=pos_int, default=1, help="passes over the training set")
    t.add_argument("--max-steps", type=nonneg_int, default=0, help="total optimizer steps (0: from --epochs)")
    t.add_argument("--batch-size", "--batchsize", type=pos_int, default=64,
                   help="micro-batch: per process under DDP; the whole batch, split over the GPUs, under --dp")
    t.add_argument("--accum-steps", type=pos_int, default=1, metavar="K",
                   help="micro-batches per optimizer step; the contrastive loss sees all K (global batch = "
                        "batch-size x K x processes), exactly as one batch K times larger; the LR is unchanged")
    t.add_argument("--lr", "--learning-rate", type=_number(float, 0, False), default=5e-4, help="peak learning rate")
    t.add_argument("--lr-scale", choices=("linear", "none"), default="linear",
                   help="linear: multiply --lr by the number of DDP processes")
    t.add_argument("--warmup", type=nonneg_int, default=100, help="linear warm-up steps, then cosine decay")
    t.add_argument("--weight-decay", type=_number(float, 0), default=0.1, help="AdamW weight decay (not on norms, biases)")
    t.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="mixed precision; fp16 uses a GradScaler (CUDA), bf16 needs no scaler")
    t.add_argument("--grad-clip", type=_number(float, 0), default=0.0, help="max gradient norm (0: off)")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (StarNet stages, text transformer): less "
                        "memory, about a third more compute")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoint keys stay plain)")
    t.add_argument("--seed", type=nonneg_int, default=0, help="same init on every rank; data seeded seed + rank")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, "
                        "no cuDNN autotuning): bit-exact resume on a GPU, slower (docs/training.md)")
    t.add_argument("--freeze-bn", action="store_true", help="every BatchNorm uses and keeps its running statistics")
    t.add_argument("--sync-bn", action="store_true",
                   help="DDP on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    t.add_argument("--loss-region", type=_number(float, 0), default=0.0, metavar="W",
                   help="weight of the box-phrase region loss (0: off)")
    t.add_argument("--use-region-loss", action="store_true",
                   help="the older scripts' switch: --loss-region 0.5 when --loss-region is not given")


def _output_flags(p: argparse.ArgumentParser, pos_int, nonneg_int) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help=f"checkpoints, metrics.json, tb/ (default: {OUTPUT_ROOT}/<image>_<text>, "
                                        "as run_train_clip.sh names it)")
    o.add_argument("--save-every", type=nonneg_int, default=0, help="checkpoint every N steps (0: at the end)")
    o.add_argument("--keep-checkpoints", type=pos_int, default=2, help="how many checkpoint_<step>.pt to keep")
    o.add_argument("--eval-every", type=nonneg_int, default=0, help="evaluate every N steps (0: at the end)")
    o.add_argument("--log-every", type=nonneg_int, default=0,
                   help="progress line (loss, samples/s, ETA) every N steps (0: about 20 a run)")
    o.add_argument("--check-every", type=pos_int, default=10, metavar="N",
                   help="every N steps (and at each progress line) the one host sync: is the loss finite, did a "
                        "signal arrive (all ranks agree), how many images were bad")
    o.add_argument("--no-tb", dest="tb", action="store_false",
                   help="no TensorBoard events (default: written to <output-dir>/tb)")
    o.add_argument("--resume", metavar="auto|PATH",
                   help="auto: the newest checkpoint in --output-dir, if any (default: none, a fresh start)")
    o.add_argument("--stop-after", type=pos_int, metavar="STEPS",
                   help="end after this many steps with a resumable checkpoint; the schedule is unchanged "
                        "(default: none, run to the end)")
    o.add_argument("--preset", choices=tuple(PRESETS), help="defaults for the demo or the full-size run")


def _device_flags(p: argparse.ArgumentParser, pos_int, nonneg_int) -> None:
    r = p.add_argument_group("devices")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--dp", action="store_true", help="DataParallel over every visible GPU (ignored without one)")
    r.add_argument("--distributed", action="store_true", help="DDP (implied under torchrun)")
    r.add_argument("--local_rank", "--local-rank", type=nonneg_int, default=None,
                   help="set by the legacy launcher (default: LOCAL_RANK, else --rank modulo the visible GPUs)")
    r.add_argument("--world_size", "--world-size", type=pos_int, default=None,
                   help="with --dist-url tcp://: the number of processes (default: WORLD_SIZE)")
    r.add_argument("--rank", type=nonneg_int, default=None, help="with --dist-url tcp://: this process's rank "
                                                                  "(default: RANK)")
    r.add_argument("--dist_url", "--dist-url", default="env://", help="init method: env:// or tcp://HOST:PORT")
    r.add_argument("--dist-timeout", type=pos_int, default=600, metavar="SECONDS",
                   help="how long a collective may wait for a missing rank before the job fails")


class _Parser(argparse.ArgumentParser):
    """Errors in two lines, not the 40-line usage: where the full list is, then the error (last, where a
    log's tail and --check-trainer read it), with the nearest flag for one that does not exist."""

    def error(self, message: str):
        unknown = re.findall(r"(--?[A-Za-z][\w-]*)", message) if message.startswith("unrecognized") else []
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        near = [m for flag in unknown for m in difflib.get_close_matches(flag.split("=")[0], flags, n=1)]
        if near:
            message += f" (did you mean {', '.join(dict.fromkeys(near))}?)"
        sys.stderr.write(f"usage: {self.prog} [flags]; {self.prog} --help lists every flag\n"
                         f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mgpu.train_clip", formatter_class=_Help,
                                description="Train a CLIP model (a StarNet image tower and a CLIP or BERT text "
                                            "tower) on one CPU, one GPU, DataParallel or DDP.")
    pos_int, nonneg_int = _number(int, 1), _number(int, 0)
    for add in (_model_flags, _data_flags, _training_flags, _output_flags, _device_flags):
        add(p, pos_int, nonneg_int)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    if args.image_size % IMAGE_STRIDE:
        parser.error(f"argument --image-size: {args.image_size} cannot be taken by {args.image_encoder}: "
                     f"it must be a multiple of {IMAGE_STRIDE} (e.g. {max(IMAGE_STRIDE, args.image_size // IMAGE_STRIDE * IMAGE_STRIDE)})")
    for tower in ("image", "text"):
        unlocked = getattr(args, f"lock_{tower}_unlocked")
        if unlocked and not getattr(args, f"lock_{tower}"):
            parser.error(f"argument --lock-{tower}-unlocked: {unlocked} needs --lock-{tower} (it says which blocks of "
                         f"the locked {tower} tower stay trainable)")
    if args.use_region_loss and not args.loss_region:
        args.loss_region = 0.5
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.image_encoder, args.text_encoder)
    return args
