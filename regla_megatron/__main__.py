"""`python -m regla_megatron ...` is the `regla-megatron` command (also under torchrun)."""

import sys

from regla_megatron.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
