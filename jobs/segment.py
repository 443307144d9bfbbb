"""Ray job: train the 2.5D segmentation U-Net (MONAI) on Ray Train and log its held-out Dice per structure to MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/segment.py --config configs/rsna-gpu.yaml data.root=/mnt/rsna segment.source=points

Rerunning a finished U-Net does nothing; an interrupted one resumes from its checkpoint. Arguments are those of
``lumbar-ray segment``.
"""

import sys

from lumbar_ray.cli import main

if __name__ == "__main__":
    main(["segment", *sys.argv[1:]])
