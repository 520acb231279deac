"""What every program does first, before torch is imported (so each imports this module first):

- OMP_WAIT_POLICY=PASSIVE, unless it is set: torch's OpenMP threads then sleep while they wait instead of spinning,
  which keeps two torch jobs on one CPU from slowing each other down a hundredfold (README, "Troubleshooting").
  OpenMP reads it once, when torch loads it.
- Ctrl-C at any moment, while the imports run too, ends the program with one line and exit status 130, as shells
  expect for SIGINT, not with a traceback. (Once main() runs, cli.run says the same.)
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_interrupt(kind, value, traceback):
    """sys.excepthook: a KeyboardInterrupt nothing caught is one line and exit status 130; anything else as usual."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    sys.stdout.flush()
    print("\ninterrupted", file=sys.stderr, flush=True)
    os._exit(130)


sys.excepthook = quiet_interrupt
