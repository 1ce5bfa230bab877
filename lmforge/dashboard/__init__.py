"""``lmforge dashboard``: a local web app over the registry and run folders (runs, training curves, lineage, data,
evaluation).  It only reads what stages write; every asset ships in ``static/`` (no CDN)."""
