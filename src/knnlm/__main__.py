"""`python -m knnlm` = the `knnlm` command (used under torchrun: `torchrun --nproc_per_node 2 -m knnlm datastore build ...`)."""
import sys

from .cli import main

sys.exit(main())
