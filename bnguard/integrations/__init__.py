"""bnguard's hooks inside the trainers people already use: :mod:`bnguard.integrations.lightning` (a Lightning
``Callback``) and :mod:`bnguard.integrations.transformers` (a Hugging Face ``TrainerCallback``). Each is
imported on its own, so that bnguard itself needs neither framework."""
