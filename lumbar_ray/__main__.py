"""``python -m lumbar_ray``: the same as the ``lumbar-ray`` command."""

from lumbar_ray.cli import main

if __name__ == "__main__":
    main()
