"""Layer 0: validation of arguments, console output, process groups, the checkpoint manifest. Imports nothing
of bnguard."""
