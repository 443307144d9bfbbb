"""Ray job: k-fold training of the classifier on the preprocessing cache, tracked in MLflow, ensemble registered.

Submit to a running head (cluster: README, "Run on a cluster"; MLFLOW_TRACKING_URI must name a server that every
node reaches, e.g. ``http://<head-ip>:5000``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://10.0.0.10:5000"}}' -- \
        python jobs/train.py --config configs/rsna-gpu.yaml data.root=/mnt/rsna

Rerunning the same command after an interruption resumes: finished folds are skipped and an unfinished fold
restarts from its latest checkpoint. Arguments are those of ``lumbar-ray train``.
"""

import sys

from lumbar_ray.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
