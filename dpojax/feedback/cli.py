"""``dpojax label ROUND [--port N] [--annotator NAME]``; ``register_cli`` adds it."""

from __future__ import annotations

import argparse


def cmd_label(args: argparse.Namespace) -> int:
    from dpojax.feedback.server import serve

    serve(args.round, host=args.host, port=args.port, annotator=args.annotator)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``label`` to the ``dpojax`` parser."""
    p = subparsers.add_parser("label", help="serve the web page where people label a D3PO round (saved at once, "
                                            "resumable)")
    p.add_argument("round", help="round folder written by `dpojax d3po sample CONFIG`")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is printed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; the default serves this machine only (reach it over SSH -L)")
    p.add_argument("--annotator", help="label as this name (default: the page asks)")
    p.set_defaults(run=cmd_label)
