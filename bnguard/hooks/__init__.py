"""Layer 3: the hook protocol (events, state, the Hook base class, trackers) and bnguard's hooks. Imports the
layers below; never accelerate, nor any driver that fires the events."""
