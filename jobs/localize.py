"""Ray job: train the sagittal YOLO level detectors (one Ray task each, with the GPU it asks for) and log the
localisation metrics of the held-out fold to MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/localize.py --config configs/rsna-gpu.yaml data.root=/mnt/rsna

Rerunning skips trained detectors. Arguments are those of ``lumbar-ray localize``.
"""

import sys

from lumbar_ray.cli import main

if __name__ == "__main__":
    main(["localize", *sys.argv[1:]])
