"""`python -m sdlab.train ...` and `torchrun --nproc-per-node N -m sdlab.train ...`."""

import argparse
import logging
import sys

from .cli import add_arguments, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m sdlab.train", description="Train a VAE, a UNet or a LoRA.")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
