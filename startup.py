"""What every program does first, before torch is imported (so each imports this module first):

- OMP_WAIT_POLICY=PASSIVE, unless it is set: torch's OpenMP threads then sleep while they wait instead of spinning,
  which keeps two torch jobs on one CPU from slowing each other down a hundredfold (README, "Troubleshooting").
  OpenMP reads it once, when torch loads it.
- Ctrl-C at any moment, while the imports run too, ends the program with one line and exit status 130, as shells
  expect for SIGINT, not with a traceback. Python's own handler raises KeyboardInterrupt wherever the program is,
  which inside an import (torch imports more of itself when the first model is built) can leave a module half made,
  be swallowed by C++ code, or abort the process. So until a program asks for the interrupt as an exception
  (cli.interrupts_raise: where it has something to finish, as make_prior.py's images, or train.py's loop, which
  saves first), Ctrl-C exits at once: nothing is half written before then.
"""
import os
import signal
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def exit_130(signum=None, frame=None):
    """Say "interrupted" in one line and end the process with exit status 130, at once."""
    sys.stdout.flush()
    print("\ninterrupted", file=sys.stderr, flush=True)
    os._exit(130)


def quiet_interrupt(kind, value, traceback):
    """sys.excepthook: a KeyboardInterrupt nothing caught is one line and exit status 130; anything else as usual."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    exit_130()


signal.signal(signal.SIGINT, exit_130)
sys.excepthook = quiet_interrupt
