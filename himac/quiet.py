"""A quiet terminal: the known third-party noise of a run, filtered narrowly, by message.

What a default run printed before its first progress bar, and what `quiet()` does about it:
- transformers' "Loading weights" bar on every model load, and its "Converting and
  de-quantizing GGUF tensors" bar (one tick per tensor) when the embedded SmolLM2 is
  materialised the first time: transformers' own progress bars are switched off
  (`transformers.utils.logging.disable_progress_bar`); himac's bars stay;
- FutureWarnings that transformers raises about its own API when peft calls it
  (`is_gradient_checkpointing` is deprecated): ignored by message (NOISY_WARNINGS);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning (on
  CPUs with AVX512-BF16 it tries to fetch a kernel from the hub at import; without network
  it falls back to its own kernel, which is what runs anyway): dropped by a logging filter
  on that one logger, by message (NOISY_LOGS).
Nothing else is touched: a new warning, an error, or these same libraries saying anything
else still reaches the terminal. `--verbose` does not call `quiet()`, so everything shows.
"""
from __future__ import annotations

import logging
import re
import warnings

# (message regex, category): warnings.filterwarnings matches the regex at the start of the message
NOISY_WARNINGS = [
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
]
# logger name -> message regexes dropped from that logger (records of its own, by message)
NOISY_LOGS = {
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def quiet() -> None:
    """Filter the known noise (idempotent). Call before the models load; `--verbose` skips it."""
    for pattern, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if not _installed:
        for name, patterns in NOISY_LOGS.items():
            logger, flt = logging.getLogger(name), _DropMessages(patterns)
            logger.addFilter(flt)
            _installed.append((logger, flt))
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def verbose() -> None:
    """Undo `quiet()`: every warning and log record and transformers' bars show again."""
    for pattern, category in NOISY_WARNINGS:
        warnings.filters[:] = [f for f in warnings.filters
                               if not (f[0] == "ignore" and f[1] is not None and f[1].pattern == pattern
                                       and f[2] is category)]
    while _installed:
        logger, flt = _installed.pop()
        logger.removeFilter(flt)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.enable_progress_bar()
    except ImportError:
        pass
