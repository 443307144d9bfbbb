# The image of every node: Ray's own GPU image at the Ray version the project is tested with, plus this project.
# cluster.yaml (docker.image) and the KubeRay manifests of deploy/k8s run it; README, "Run on Kubernetes".
#
#   docker build -t YOUR-REGISTRY/lumbar-ray:0.1.0 .
#
# RAY_VERSION must stay the Ray installed in the test environment (tests/test_k8s.py checks it): the `-gpu` tag is
# Ray's alias of its CUDA build for that version. torch comes from PyPI with its own CUDA runtime libraries; the
# nodes need an NVIDIA driver recent enough for it. The dependencies are installed before the source is copied, so
# a code change rebuilds only the last layers.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION

# The base image's non-root user `ray` (uid 1000, group users 100), owner of its Python environment (~/anaconda3):
# pip installs there without root. Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 1000:100
RUN mkdir -p /home/ray/lumbar_ray
WORKDIR /home/ray/lumbar_ray

# Dependencies only (the list of pyproject.toml), with Ray held at the image's version so pip never replaces it.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "ray[default,train,tune,data,serve]==${RAY_VERSION}" \
    && rm /tmp/requirements.txt

# The project itself, and the checkout's jobs/ and configs/ beside it: the RayJobs of deploy/k8s ship this folder
# as their working_dir and run `python jobs/<stage>.py --config configs/...` from it. The check imports the
# installed copy (-I: not the checkout in the current folder).
COPY --chown=1000:100 . ./
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && python -I -c "import lumbar_ray.cli, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
