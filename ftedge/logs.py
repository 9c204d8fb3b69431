"""Logging set-up for the CLI: rich handler, quiet third-party loggers."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(debug: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else logging.INFO
    # Logs go to stderr: stdout carries what a command prints (tables, --json documents, chat answers).
    handler = RichHandler(console=Console(stderr=True), show_path=debug, rich_tracebacks=debug, markup=False, show_time=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    quiet_third_party(debug)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_third_party(debug: bool = False) -> None:
    """Third-party loggers at WARNING (DEBUG with --debug), and known-harmless warnings off."""
    for noisy in (
        "transformers",
        "torch",
        "accelerate",
        "peft",
        "bitsandbytes",
        "httpx",
        "huggingface_hub",
        "urllib3",
        "matplotlib",
        "PIL",
    ):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # bitsandbytes warns on every import that its optional `kernels` CPU kernel (fetched from
        # the Hugging Face hub) is missing; its built-in CPU path is the one ftedge uses offline.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        if not sys.stderr.isatty():  # a log file (bench workers, `ftedge run > log`): no tqdm bars ("Loading weights") in it
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            if "transformers" in sys.modules:  # it read the variable at import
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
