"""Ray job: a registered fold ensemble -> competition submission for the studies of an RSNA-format folder.

Submit to a running head (MLFLOW_TRACKING_URI must name the store holding the model, reachable from every node)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://10.0.0.10:5000"}}' -- \
        python jobs/predict.py --model models:/lumbar_ray_ensemble@champion --data /mnt/rsna \
        --out /mnt/shared/submission.csv --config configs/rsna-gpu.yaml

Preprocessing is resumable (a rerun decodes only what is not cached yet). Arguments are those of
``lumbar-ray predict``.
"""

import sys

from lumbar_ray.cli import main

if __name__ == "__main__":
    main(["predict", *sys.argv[1:]])
