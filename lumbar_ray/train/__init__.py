"""Training: plain-torch steps (:mod:`.steps`), the Ray Train worker loop (:mod:`.worker`), k-fold CV (:mod:`.cv`)."""
