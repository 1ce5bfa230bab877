"""``python -m lmforge.serve.kernels build``: compile the block-quantised matmul extension into its on-disk cache
(what the first ``--quantize int8/int4`` model load would otherwise do); exits 0 either way, saying which path runs."""

from __future__ import annotations

import logging
import sys

from lmforge.serve import kernels


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m lmforge.serve.kernels build", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = kernels.load()
    print(f"block-quantised matmul kernel: {'built in ' + str(kernels.build_dir()) if module else 'not available'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
