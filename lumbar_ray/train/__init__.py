"""Training: plain-torch steps (:mod:`.steps`), a CV's inputs (:mod:`.inputs`), the Ray Train worker loop
(:mod:`.worker`), k-fold CV (:mod:`.cv`), its MLflow records (:mod:`.report`) and registration (:mod:`.register`)."""
