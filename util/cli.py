"""The programs' command-line vocabulary: a parser whose errors are one line, and the flags programs share.

The same idea has the same flag in every program; where the released programs named a flag, that
name is kept and the other spellings are aliases (`--obj_id` / `--category`).
"""
import argparse
import sys

from util.runtime import PRECISIONS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad or missing flag is one line on stderr and exit code 1, like every other input error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def at_least(minimum: int, kind: type = int):
    """An argparse `type` accepting numbers >= `minimum` (e.g. a batch size of 1 or more)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive_float(text: str) -> float:
    """An argparse `type` accepting floats > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def add_device_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser, gpu_id: bool = True) -> None:
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or cuda")
    if gpu_id:
        group.add_argument("--gpu_id", type=at_least(0), default=0, help="CUDA device index with --device cuda or auto")


def add_dataset_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser, layouts: tuple[str, ...]) -> None:
    group.add_argument("--dataset", choices=layouts, default="mvtec",
                       help="layout of --data_path: mvtec | folder (<root>/<category>/train/good, test/<good|defect>, optional "
                            "ground_truth/<defect>/<stem><mask_suffix>.png) | visa (<root>/split_csv/1cls.csv)")
    group.add_argument("--mask_suffix", default="_mask",
                       help="mask file name ending for mvtec/folder test sets: ground_truth/<defect>/<stem><suffix>.png")


def add_fast_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="bf16: forward under bf16 autocast; losses and metrics stay fp32")
    group.add_argument("--channels_last", action="store_true", help="channels-last memory layout for weights and inputs")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (slow first step; needs a C compiler)")


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that name one category's checkpoint pair (predict, export)."""
    parser.add_argument("--checkpoint_path", required=True, help="folder holding the checkpoint pair")
    parser.add_argument("--base_model_name", required=True,
                        help="checkpoint base name: files <base>_<category>_.pckl and <base>_<category>__seg.pckl")
    parser.add_argument("--obj_id", "--category", dest="obj_id", required=True,
                        help="the category part of the checkpoint file names, e.g. carpet")
