"""The `fusedvq` command: check a VQ-VAE checkpoint, run the demo, benchmark.

    fusedvq check PATH [--features D] [--stats NPZ|checkpoint] [--norm stats|batch|none] [--trust]
    fusedvq demo [--steps N] [--batch-size B] [--device DEV] [--checkpoint PATH]
    fusedvq bench ...

Exit codes: 0 fine, 1 the checkpoint does not fit (or cannot be read), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, TextIO

from .. import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedvq",
        description="The masked, normalized feature-reconstruction loss of VQ-VAE-guided training, fused.",
        epilog="Run `fusedvq demo` to see it train; `fusedvq check PATH --features D` before you swap it in.",
    )
    parser.add_argument("--version", action="version", version=f"fusedvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser(
        "check", help="say what a VQ-VAE checkpoint declares and what does not fit",
        description="Print what a VQ-VAE checkpoint declares (feature width, kept columns, decoder input_dim, "
                    "categories, normalization) and one sentence per problem; exit 1 when anything does not fit.",
    )  # fmt: skip
    check.add_argument("path", metavar="PATH", help="the checkpoint (.pt) or the folder holding it")
    check.add_argument("--features", type=int, metavar="D", help="the width of your feature extractor's output")
    check.add_argument("--stats", metavar="NPZ",
                       help="statistics to use: an .npz path, or 'checkpoint' for the file's own only "
                            "(default: the file's own, else normalization_stats.npz beside it)")
    check.add_argument("--norm", choices=("stats", "batch", "none"), default="stats",
                       help="the loss's normalization; only 'stats' (the default) needs group_indices and statistics")
    check.add_argument("--trust", action="store_true",
                       help="allow pickled Python objects in the file (can run code stored in it)")

    from . import demo

    demo_parser = sub.add_parser("demo", help="train a small VQ-VAE-guided model with the fused loss (the main job)",
                                 description=demo.__doc__.splitlines()[0])
    demo.add_arguments(demo_parser)

    # The benchmark module is imported only when `bench` runs: its options are parsed there.
    sub.add_parser("bench", help="benchmark the loss (fused, reference, eager, compiled)", add_help=False,
                   prefix_chars="\0").add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "check":
        return check(args.path, features=args.features, stats=args.stats, trust=args.trust, norm=args.norm)
    if args.command == "demo":
        from . import demo

        with _warnings_to(sys.stderr):
            return demo.run(args)
    return _bench(args.rest)


def _bench(rest: list[str]) -> int:
    try:
        from . import benchmark
    except ImportError as err:
        print(f"error: fusedvq bench is not available in this installation ({err})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="fusedvq bench", description="Benchmark the fused loss.")
    benchmark.add_arguments(parser)
    return benchmark.run(parser.parse_args(rest))


class _warnings_to:
    """Show warnings (e.g. trust=True's) as one plain line each, without file and line numbers."""

    def __init__(self, stream: TextIO):
        self.stream, self.saved = stream, None

    def __enter__(self):
        self.saved = warnings.showwarning
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=self.stream)
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self.saved
        return False


MAX_LISTED = 40  # categories listed one per line
MAX_LINE = 4_000  # characters of one printed sentence


def check(path: str, *, features: Optional[int] = None, stats: Optional[str] = None, trust: bool = False,
          norm: str = "stats", out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Print what the checkpoint declares (to out) and one sentence per problem (to err); 0 when it fits."""
    # printable: names taken from a file must not drive the terminal they are printed to
    from ..checkpoint import declare, find_notes, find_problems, printable
    from ..checkpoint.errors import capped, require_flag

    trust = require_flag("trust", trust)

    out, err = out or sys.stdout, err or sys.stderr

    def say(line: str = "") -> None:
        print(printable(line), file=out)

    from ..strict import check_count, check_flag, option_code

    trust = check_flag("trust", trust)  # (a string "False" must not unpickle the file)
    option_code("norm", norm, ("stats", "batch", "none"))
    if features is not None and check_count("features", features) <= 0:
        print(f"error: --features must be a positive width, got {features}", file=err)
        return 2
    try:
        with _warnings_to(err):
            decl = declare(path, trust=trust, stats=stats, need_stats=norm == "stats")
        problems = find_problems(decl, features, need_stats=norm == "stats")
        notes = decl.notes if problems else find_notes(decl)
    except Exception as exc:  # a last guard: a bad file must never end in a traceback
        decl, problems, notes = None, [f"{path} could not be checked ({type(exc).__name__}: {exc})"], []

    if decl is not None:
        _describe(decl, features, norm, say, "not used, see the note" if notes else
                  "not compared: see the problems" if problems else "the same statistics")
    for note in notes:
        say(f"note: {note}")
    if problems:
        for problem in capped(problems):  # (a file chooses how many there are: the rest are counted)
            print(printable(f"error: {problem[:MAX_LINE]}"), file=err)
        print(printable(_summary(decl, problems, features)), file=err)
        return 1
    kept = decl.num_kept
    fit = f"a {features}-column extractor" if features else f"a {decl.feature_mask.shape[0]}-column extractor"
    hybrid = f", {decl.hybrid.gap_width} of them embedding columns" if decl.hybrid is not None else ""
    say(f"ok: consistent; {fit} fits ({kept} kept columns, decoder input_dim {decl.input_dim}{hybrid})")
    if features is None:
        say("  (pass --features D to check the width of your extractor's output too)")
    return 0


def _summary(decl, problems: list[str], features: Optional[int]) -> str:
    """The closing line: what kind of problems were found, not a guess that the widths differ."""
    noun = "problem" if len(problems) == 1 else "problems"
    if decl is not None and decl.stats_only and decl.stats is None:
        return f"{len(problems)} {noun}: {decl.path.name} is an .npz archive fusedvq cannot use as statistics"
    if decl is not None and decl.stats_only:
        return (f"{len(problems)} {noun}: {decl.path.name} is a statistics file; the loss needs a mask and group "
                f"indices too")
    if decl is None or (decl.feature_mask is None and decl.input_dim is None and decl.categories is None):
        return f"{len(problems)} {noun}: no checkpoint could be read at {decl.path if decl else 'that path'}"
    kinds = []
    mask = decl.feature_mask
    width = features is not None and mask is not None and mask.shape[0] != features
    if width:
        kinds.append(f"its feature_mask ({mask.shape[0]} columns) does not fit a {features}-column extractor")
    rest = len(problems) - int(width)
    if rest:
        kinds.append(f"{rest} missing or inconsistent piece{'s' if rest != 1 else ''} in the checkpoint")
    return f"{len(problems)} {noun}: " + "; ".join(kinds)


def _describe(decl, features: Optional[int], norm: str, say, other: str = "") -> None:
    """The declared facts, one per line; unknown pieces say so."""
    if decl.stats_only and decl.stats is None:
        say(f"file            {decl.path} (an .npz archive)")
        return
    if decl.stats_only:
        from ..checkpoint import describe_stats

        say(f"statistics file {decl.path}")
        say(f"holds           {describe_stats(decl.stats, decl.method)}")
        say("lacks           feature_mask and group_indices (they are in the VQ-VAE checkpoint)")
        return
    say(f"checkpoint      {decl.path}")
    if decl.feature_mask is None and decl.input_dim is None and decl.categories is None and decl.stats is None:
        return  # nothing could be read: the errors say why
    mask = decl.feature_mask
    if mask is not None:
        kept = int(mask.sum())
        say(f"feature_mask    {mask.shape[0]} original feature columns, {kept} kept ({mask.shape[0] - kept} dropped)")
    else:
        say("feature_mask    (missing or unreadable)")
    say(f"decoder         input_dim {decl.input_dim if decl.input_dim is not None else 'unknown'}")
    _describe_hybrid(decl, say)
    if decl.categories is not None:
        _describe_categories(decl, say)
        if len(decl.categories) > MAX_LISTED:
            say(f"  ... and {len(decl.categories) - MAX_LISTED:,} more")
    else:
        say("categories      (none declared)")
    if decl.stats is not None:
        pair = {"standard": "mean/std", "mad": "median/mad"}.get(decl.method or "", "statistics")
        scope = "over all columns" if "" in decl.stats else "per category"
        say(f"normalization   {decl.method or 'unknown method'} ({pair}) {scope}, from {decl.stats_source}")
        if decl.other_path is not None:  # a statistics file beside a checkpoint that has its own
            say(f"                (also {decl.other_path.name} in {decl.other_path.parent}: {other})")
    elif norm != "stats":
        say(f"normalization   not read (--norm {norm} needs no statistics)")
    else:
        say("normalization   (no statistics found)")
    if decl.feature_names is not None:
        say(f"feature_names   {len(decl.feature_names)}")
    say(f"extractor       {features} columns (--features)" if features is not None
        else "extractor       width not given (--features D)")


def _describe_categories(decl, say) -> None:
    """The categories and their sizes; for a hybrid in both spaces: kept feature columns (the statistics'
    and the feature-only loss's) and decoder columns (the hybrid objective's and the trainer's metric's)."""
    total = sum(idx.size for idx in decl.categories.values())
    decoder = decl.decoder_categories if decl.hybrid is not None else None
    if decoder is None or set(decoder) != set(decl.categories):
        say(f"categories      {len(decl.categories)}, listing {total} kept columns")
    else:
        wide = sum(decoder[name].size for name in decl.categories)
        say(f"categories      {len(decl.categories)}, listing {total} kept feature columns "
            f"(pre_model_group_indices) and {wide} decoder columns (model_config's group_indices)")
        say("  (category_errors: over decoder columns, as the trainer counts them; feature_category_errors: over "
            "kept feature columns)")
    names = [name if len(name) <= 40 else name[:37] + "..." for name in list(decl.categories)[:MAX_LISTED]]
    width = max(map(len, names), default=0)
    for name, (key, idx) in zip(names, decl.categories.items()):
        if decoder is None or key not in decoder:
            say(f"  {name:<{width}}  {idx.size:4d} columns")
        else:
            say(f"  {name:<{width}}  {idx.size:4d} kept feature columns, {decoder[key].size} decoder columns")


def _describe_hybrid(decl, say) -> None:
    """A hybrid VQ-VAE's layout in a few lines: which decoder columns are features, which embeddings."""
    layout = decl.hybrid
    if layout is None:
        if decl.clues.is_hybrid:
            say(f"hybrid          yes ({decl.clues.evidence()}); layout not derived (see below)")
        return
    p, c, K = layout.gap_at, layout.gap_width, layout.num_kept  # (as the message writes them)
    initial = f"the {layout.family!r} family's" if layout.family else "the initial family's"
    count = f" {layout.num_initial}" if layout.num_initial else ""
    say(f"hybrid          yes ({decl.clues.evidence()}): an initial encoder adds {c} embedding columns")
    say(f"  feature cols  decoder 0..{p - 1} = kept 0..{p - 1} (up to and including {initial}{count} columns)"
        if p else "  feature cols  none before the embedding columns")
    say(f"  embeddings    decoder {p}..{p + c - 1} ({c} columns, not extracted features: left to the caller)")
    if p < K:
        say(f"  feature cols  decoder {p + c}..{K + c - 1} = kept {p}..{K - 1}")
    say(f"  derived from  {layout.source}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
