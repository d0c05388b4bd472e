"""The programs' command-line vocabulary: a parser whose errors are one line, and the flags programs share.

The same idea has the same flag in every program; where the released programs named a flag, that
name is kept and the other spellings are aliases (`--obj_id` / `--category`).
"""
import argparse
import math
import sys

from util.runtime import PRECISIONS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad or missing flag is one line on stderr and exit code 1, like every other input
    error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        # a flag means what it says: `--epoch` is not quietly `--epochs`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def typed(self, argv: list[str] | None = None) -> set[str]:
        """The destinations of the flags the user typed (a default equal to a typed value still counts as
        typed)."""
        argv = sys.argv[1:] if argv is None else argv
        return {action.dest for action in self._actions for option in action.option_strings
                for token in argv if token == option or token.startswith(option + "=")}

    def error(self, message: str) -> None:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def at_least(minimum: int, kind: type = int):
    """An argparse `type` accepting numbers >= `minimum` (e.g. a batch size of 1 or more)."""

    def parse(text: str):
        value = _number(text, kind)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _number(text: str, kind: type = float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):  # nan or inf: a number that means nothing here
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse `type` accepting finite floats > 0 (a learning rate, a tolerance)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse `type` accepting a fraction strictly between 0 and 1 (a share of the images to hold
    out)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse `type` accepting finite floats >= 0 (a loss weight)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse `type` accepting any finite float (a threshold: nan would flag nothing, silently)."""
    return _number(text)


def plain_name_problem(name: str) -> str | None:
    """Why `name` cannot be a category or base name, part of file names inside one folder; None when it
    can."""
    if not name or name.strip() != name:
        return "it is empty or starts or ends with a space"
    if name in (".", "..") or any(separator in name for separator in ("/", "\\")):
        return ("a name has no '/' or '\\' and is not '.' or '..', so files named after it stay in their "
                "folder")
    if any(ord(character) < 32 for character in name):
        return "it holds a control character"
    return None


def plain_name(text: str) -> str:
    """An argparse `type` for a category or checkpoint base name: a plain name that cannot lead out of its
    folder."""
    problem = plain_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: {problem}")
    return text


class ImageSize(argparse.Action):
    """--image_size S (square) or --image_size H W: stored as the tuple (height, width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            parser.error(f"{option_string} takes one side or height and width, got {len(values)} numbers")
        setattr(namespace, self.dest, (values[0], values[-1]))


def add_image_size_flag(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """--image_size, stored as (height, width); default 256 x 256, as released."""
    group.add_argument("--image_size", nargs="+", type=at_least(32), action=ImageSize, default=(256, 256),
                       metavar="SIDE",
                       help="size of the images the model sees: one side (square; released: 256) or height "
                            "and width (e.g. 256 384), multiples of 32; test, predict, calibrate and export "
                            "at the size the model was trained at")


def add_width_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument("--base_width", type=at_least(1), default=128,
                       help="reconstructive network width (released: 128)")
    group.add_argument("--seg_base_width", type=at_least(1), default=64,
                       help="discriminative network width (released: 64)")


def add_device_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser, gpu_id: bool = True) -> None:
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or cuda")
    if gpu_id:
        group.add_argument("--gpu_id", type=at_least(0), default=0,
                           help="CUDA device index with --device cuda or auto")


def add_dataset_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser,
                      layouts: tuple[str, ...]) -> None:
    group.add_argument("--dataset", choices=layouts, default="mvtec",
                       help="layout of --data_path: mvtec | folder (<root>/<category>/train/good, "
                            "test/<good|defect>, optional ground_truth/<defect>/<stem><mask_suffix>.png) | "
                            "visa (<root>/split_csv/1cls.csv) | mvtec_ad2 (MVTec AD 2: train/good, "
                            "validation/good, test_public) | mvtec_loco (MVTec LOCO AD: train/good, "
                            "validation/good, test, ground_truth/<defect>/<stem>/*.png)")
    group.add_argument("--mask_suffix", default="_mask",
                       help="mask file name ending for mvtec/folder test sets: "
                            "ground_truth/<defect>/<stem><suffix>.png")


def add_fast_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="bf16: forward under bf16 autocast; losses and metrics stay fp32")
    group.add_argument("--channels_last", action="store_true",
                       help="channels-last memory layout for weights and inputs")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (slow first step; needs a C compiler)")


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that name one category's checkpoint pair (predict, export)."""
    parser.add_argument("--checkpoint_path", required=True, help="folder holding the checkpoint pair")
    parser.add_argument("--base_model_name", required=True, type=plain_name,
                        help="checkpoint base name: files <base>_<category>_.pckl and "
                             "<base>_<category>__seg.pckl")
    parser.add_argument("--obj_id", "--category", dest="obj_id", required=True, type=plain_name,
                        help="the category part of the checkpoint file names, e.g. carpet")
