"""Ray job: decode an RSNA-format folder's DICOM series into the preprocessing cache.

Submit to a running head (local: see tests/test_jobs.py; cluster: README, "Run on a cluster")::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/preprocess.py --data /mnt/rsna --cache s3://my-bucket/lumbar-ray/cache --workers 16

Inside a job RAY_ADDRESS is set, so the library's ``ray.init()`` joins the cluster. ``--working-dir .`` ships
this checkout (it is put on the workers' Python path); the dependencies come from the cluster's image
(``Dockerfile``, named in cluster.yaml). Arguments are those of ``lumbar-ray preprocess``.
"""

import sys

from lumbar_ray.cli import main

if __name__ == "__main__":
    main(["preprocess", *sys.argv[1:]])
