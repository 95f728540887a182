"""Layer 4: what fires the hooks' events: the hook runner, :class:`bnguard.Loop` and its parts,
:class:`bnguard.Guard` for a hand-written loop, and the records and checkpoints of a run."""
