"""`python -m cli ...` is `mind ...` (torchrun and subprocesses use it: `torchrun ... -m cli train`)."""

from cli.app import main

main()
