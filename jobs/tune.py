"""Ray job: Ray Tune + Optuna search over loss weights, augmentations and optimiser settings on the k-fold CV.

Submit to a running head (cluster: README, "Run on a cluster"; MLFLOW_TRACKING_URI must name a server that every
node reaches)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://10.0.0.10:5000"}}' -- \\
        python jobs/tune.py --config configs/rsna-gpu.yaml --num-samples 24 data.root=/mnt/rsna

After an interruption submit the same command with ``--resume``: finished trials are kept, unfinished ones
continue from their fold checkpoints. Arguments are those of ``lumbar-ray tune``.
"""

import sys

from lumbar_ray.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
