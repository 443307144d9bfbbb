"""Ray Tune + Optuna over the k-fold CV: search space, the trial trainable, the tuning driver."""
