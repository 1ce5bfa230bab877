"""Feedback from production: ``lmforge serve --record`` stores every answer (``store``), ``POST /v1/feedback``
attaches human judgement to it, ``lmforge feedback export`` (``export``) turns both into SFT / DPO JSONL."""
